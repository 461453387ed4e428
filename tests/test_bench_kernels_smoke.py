"""scripts/bench_kernels.py --smoke: every benchmark code path runs on CPU and finds ours correct.

The numbers of a smoke run mean nothing (interpreter, tiny shapes); what is tested is that each
section runs ours and its baselines, checks correctness, prints its table and writes the JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about a minute: every section's CPU smoke run
def test_bench_kernels_smoke_runs_every_section(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "scripts/bench_kernels.py", "--smoke", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["smoke"] and report["ok"]

    attention = report["attention"]
    ours = {"ours", "ours-hopper", "ours-hopper-det"}
    assert {r["impl"] for r in attention} == ours | {"sdpa-math", "flex"}
    assert {r["Hkv"] < r["Hq"] for r in attention} == {True, False}  # MHA and GQA cases
    assert {r["docs"] > 0 for r in attention} == {True, False}  # and packed documents
    for row in attention:
        if row["impl"] == "flex" or (row["docs"] and row["impl"] == "sdpa-math"):
            assert "error" in row  # no FlexAttention backward on CPU; no document mask in SDPA
            continue
        assert row["fwd_tflops"] > 0 and row["bwd_tflops"] > 0 and row["fwd_bwd_tflops"] > 0
        assert len(row["max_err"]) == 4  # out, dq, dk, dv against the fp32 reference
    assert all(r["ok"] for r in attention if r["impl"] in ours)

    adamw = report["adamw"]
    timed = [r for r in adamw if "step_ms" in r]
    assert {r["impl"] for r in timed} == {"ours", "torch-fused", "torch-foreach"}
    assert all(r["bytes_per_param"] == 28 for r in timed)  # fp32: p, m, v read+write, g read
    checked = [r for r in adamw if "max_err" in r]
    assert checked and all(r["ok"] for r in checked)
    clipped = {r["impl"] for r in adamw if r.get("step_clip_ms", 0) > 0}
    assert clipped == {"ours+clip", "torch-fused+clip"}

    xent = {r["impl"]: r for r in report["linear_cross_entropy"]}
    assert xent["ours"]["ok"] and xent["torch-unfused"]["fwd_bwd_ms"] > 0
    assert xent["ours-previous-dw"]["fwd_bwd_ms"] > 0

    pointwise = report["pointwise"]
    assert {(r["op"], r["impl"]) for r in pointwise} == {
        (op, impl)
        for op in ("rms_norm", "add_rms_norm", "swiglu", "rope")
        for impl in ("ours", "torch-eager", "torch-compile")
    } | {("add_rms_norm", "ours-separate")}
    assert all(r["ok"] for r in pointwise if r["impl"] == "ours")
    decode = report["decode_attention"]
    assert {r["impl"] for r in decode} == {"ours-split-kv", "ours-single-pass"}
    assert all(r["ok"] and r["ms"] > 0 for r in decode)
    muon = {r["impl"]: r for r in report["muon"]}
    assert muon["ours"]["ok"] and muon["ours"]["max_rel_err"] <= 1e-4  # fp32 in the interpreter
    assert muon["torch-batched"]["ms"] > 0 and muon["ours-step"]["ms"] > 0
    if "torch-muon-step" in muon:  # torch.optim.Muon exists from torch 2.9
        assert muon["torch-muon-step"]["ms"] > 0 and muon["torch-muon"]["max_rel_err"] < 0.1
    assert "fwd_bwd_gbps" in proc.stdout and "all kernels correct" in proc.stdout


def test_bench_kernels_without_cuda_says_so_and_exits_0():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(
        [sys.executable, "scripts/bench_kernels.py", "--sections", "attention"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout


def test_gpu_correctness_smoke_checks_every_op(tmp_path):
    out = tmp_path / "correctness.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_correctness.py", "--smoke", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    ops = {c["op"] for c in report["checks"]}
    assert ops == {
        "attention",
        "decode_attention",
        "rms_norm",
        "swiglu",
        "rope",
        "linear_cross_entropy",
        "adamw",
        "add_rms_norm",
        "rope bthd",
        "adamw clipped",
        "newton_schulz",
        "muon",
    }
    assert report["ok"] and all(c["err_ours"] <= c["limit"] for c in report["checks"])
