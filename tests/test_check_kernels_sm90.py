"""scripts/check_kernels_sm90.py: every Triton kernel builds for sm_90 without spills, and the check
catches what the interpreter lets through (8x8 dots, spills, matrix kernels without HGMMA,
kernels nobody builds).

The check runs as a subprocess without TRITON_INTERPRET (conftest sets it for this process, and the
interpreter replaces the compiler).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_kernels_sm90.py"
FIXTURES = ROOT / "tests" / "sm90_fixtures"


def run_check(tmp_path: Path, *args: str, timeout: float = 900) -> tuple[int, str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "sm90.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    text = proc.stdout + proc.stderr
    report = json.loads(out.read_text()) if out.exists() else {}
    return proc.returncode, text, report


def fixture(*names: str) -> list[str]:
    args = ["--no-package"]
    for name in names:
        args += ["--module", str(FIXTURES / f"{name}.py")]
    return args


def builds_by_name(report: dict) -> dict[str, dict]:
    return {b["name"]: b for b in report["builds"]}


def _kernels_with_jit() -> set[str]:
    return {
        "kernels." + p.stem
        for p in (ROOT / "kernels").glob("*.py")
        if "triton.jit" in p.read_text()
    }


def test_every_kernel_of_the_package_builds_for_sm90(tmp_path):
    """The first build of every kernel (the quick form of the full check below)."""
    rc, text, report = run_check(tmp_path, "--one-per-kernel")
    assert rc == 0, text
    assert report["ok"] and not report["problems"]
    assert _kernels_with_jit() <= {b["module"] for b in report["builds"]}
    kernels = [(b["module"], b["kernel"]) for b in report["builds"]]
    assert len(kernels) == len(set(kernels)), "one build per kernel"
    for build in report["builds"]:
        assert build["ok"] and build["stack"] == 0 and build["local"] == 0, build


@pytest.mark.slow
def test_kernels_package_builds_for_sm90(tmp_path):
    rc, text, report = run_check(tmp_path, timeout=3600)
    assert rc == 0, text
    assert report["ok"] and report["target"] == "cuda:90" and not report["problems"]
    assert _kernels_with_jit() <= {b["module"] for b in report["builds"]}
    for build in report["builds"]:
        assert build["ok"] and build["stack"] == 0 and build["local"] == 0, build
        assert build["smem"] <= 227 * 1024, build


def test_clean_kernels_pass_and_report_resources(tmp_path):
    rc, text, report = run_check(tmp_path, *fixture("good_kernels"))
    assert rc == 0, text
    builds = builds_by_name(report)
    matmul, scale = builds["matmul_64"], builds["scale_1024"]
    assert matmul["hgmma"] > 0 and matmul["ffma"] == 0
    assert 0 < matmul["regs"] <= 255 and matmul["smem"] > 0
    assert scale["hgmma"] is None and scale["stack"] == 0  # SASS is read for matrix builds
    assert "tile_matmul_kernel" in text and "HGMMA" in text  # the printed table


def test_8x8_dot_fails_to_compile(tmp_path):
    rc, text, report = run_check(tmp_path, *fixture("good_kernels", "dot8"))
    assert rc == 1
    builds = builds_by_name(report)
    assert builds["matmul_64"]["ok"] and builds["scale_1024"]["ok"]
    assert not builds["dot_8x8"]["ok"]
    assert "compile error" in builds["dot_8x8"]["problems"][0]
    assert "K >= 16" in text


def test_spilling_kernel_fails(tmp_path):
    rc, text, report = run_check(tmp_path, *fixture("spill"), "--jobs", "1")
    assert rc == 1
    build = builds_by_name(report)["tile_128_1warp"]
    assert build["stack"] + build["local"] > 0
    assert "spills" in build["problems"][0] and "spills" in text


def test_matrix_kernel_without_hgmma_fails(tmp_path):
    rc, text, report = run_check(tmp_path, *fixture("no_hgmma"), "--jobs", "1")
    assert rc == 1
    build = builds_by_name(report)["outer_16"]
    assert build["hgmma"] == 0 and build["ffma"] > 0
    assert "without HGMMA" in build["problems"][0]


@pytest.mark.parametrize(
    "name, message",
    [
        ("uncovered", "forgotten_kernel is a @triton.jit function that no sm90_builds()"),
        ("autotune_gap", "autotune config {'BLOCK': 1024} num_warps=8 num_stages=3 has no build"),
    ],
)
def test_kernel_without_a_build_fails(tmp_path, name, message):
    args = (*fixture(name), "--jobs", "1", "--by-kernel", "--markdown")
    rc, text, report = run_check(tmp_path, *args)
    assert rc == 1
    assert all(b["ok"] for b in report["builds"])  # the builds that exist are fine
    kernel = report["builds"][0]["kernel"]
    assert f"| tests.sm90_fixtures.{name} | `{kernel}` | 1 |" in text  # the per-kernel table
    assert any(message in p for p in report["problems"]), report["problems"]
    assert message in text


def test_tma_and_warp_specialization_gates(tmp_path):
    """Descriptor builds must show UTMALDG, warp-specialized ones setmaxnreg; the table prints
    both."""
    rc, text, report = run_check(tmp_path, *fixture("descriptors"), "--jobs", "1")
    assert rc == 1
    builds = builds_by_name(report)
    plain, ws4 = builds["tma_loop"], builds["tma_loop_ws4"]
    assert plain["ok"] and plain["utmaldg"] > 0 and plain["setmaxnreg"] == 0, plain
    assert ws4["ok"] and ws4["utmaldg"] > 0 and ws4["setmaxnreg"] > 0, ws4
    assert not builds["tma_loop_ws8"]["ok"]
    assert "without setmaxnreg" in builds["tma_loop_ws8"]["problems"][0]
    assert not builds["pointers_as_tma"]["ok"]
    assert "without TMA loads" in builds["pointers_as_tma"]["problems"][0]
    assert "TMA ld/st/red" in text and "setmaxnreg" in text
