"""scripts/bench_recipe.py: the arms' configs, the analysis, the trainer's CPU-time stop, and
(slow) the whole benchmark on a tiny model and dataset."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from pretrain.config import load_config
from pretrain.plot import read_metrics
from pretrain.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = [
    ("model.vocab_size", "512"),
    ("model.n_layers", "2"),
    ("model.d_model", "32"),
    ("model.n_heads", "4"),
    ("model.n_kv_heads", "2"),
    ("model.max_seq_len", "32"),
    ("data.seq_len", "32"),
]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_recipe", ROOT / "scripts/bench_recipe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_recipe"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def _spec(arm: str, **kw) -> bench.RunSpec:
    return bench.RunSpec(arm=arm, lr=0.02, seed=1, budget_s=5.0, steps=100, out_dir="x", **kw)


def test_each_arm_is_a_valid_config_that_differs_from_a_only_where_it_says():
    configs = {
        arm: load_config(ROOT / "configs/tiny.toml", _spec(arm).overrides()) for arm in "abc"
    }
    a, b, c = configs["a"], configs["b"], configs["c"]
    assert (a.optimizer.name, b.optimizer.name, c.optimizer.name) == ("adamw", "muon", "muon")
    assert a.train.lr == 0.02 and b.optimizer.muon_lr == 0.02 and b.train.lr == 0.002
    assert a.train.schedule == b.train.schedule == "cosine" and a.train.warmup_steps == 10
    assert (c.train.schedule, c.train.min_lr_ratio, c.train.warmup_steps) == ("wsd", 0.0, 2)
    assert c.model.qk_norm and c.model.zero_init_residual and not c.model.tie_embeddings
    assert not (a.model.qk_norm or a.model.zero_init_residual or b.model.qk_norm)
    for cfg in configs.values():  # the same model, batch, budget and steps everywhere
        assert (cfg.model.d_model, cfg.model.n_layers, cfg.train.steps) == (256, 4, 100)
        assert cfg.train.cpu_budget_s == 5.0 and cfg.train.global_batch_size == 8


def test_time_to_reach_interpolates_between_evaluations_and_says_never():
    curve = [
        {"cpu_s": 0.0, "val_bpb": 4.0},
        {"cpu_s": 10.0, "val_bpb": 3.0},
        {"cpu_s": 20.0, "val_bpb": 2.0},
    ]
    assert bench.time_to_reach(curve, 2.5) == pytest.approx(15.0)
    assert bench.time_to_reach(curve, 3.0) == pytest.approx(10.0)
    assert bench.time_to_reach(curve, 1.9) is None


def test_runs_are_interleaved_across_arms():
    per_arm = {arm: [_spec(arm, evals=i) for i in range(2)] for arm in "abc"}
    order = [(s.arm, s.evals) for s in bench.interleave(per_arm)]
    assert order == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1), ("c", 1)]


def test_the_verdict_needs_both_the_time_ratio_and_a_gap_beyond_the_spread():
    def row(arm, mean, spread, ratio):
        return {"arm": arm, "mean": mean, "spread": spread, "ratio": ratio}

    assert "WINS" in bench.verdict([row("a", 3.0, 0.01, 1.0), row("c", 2.9, 0.02, 0.6)])
    assert "does not win" in bench.verdict([row("a", 3.0, 0.01, 1.0), row("c", 2.99, 0.02, 0.6)])
    assert "does not win" in bench.verdict([row("a", 3.0, 0.01, 1.0), row("c", 2.9, 0.02, 0.8)])


def test_the_trainer_stops_when_its_cpu_budget_is_spent(tiny_dataset, tmp_path):
    """train.cpu_budget_s ends the run early, with an evaluation at the last step, and every
    record carries the CPU seconds spent in training steps so far."""
    overrides = [
        *TINY_MODEL,
        ("data.path", str(tiny_dataset)),
        ("train.steps", "10000"),
        ("train.cpu_budget_s", "0.2"),
        ("train.global_batch_size", "4"),
        ("train.micro_batch_size", "4"),
        ("train.device", "cpu"),
        ("train.dtype", "fp32"),
        ("eval.every", "1000"),
        ("eval.batches", "1"),
        ("logging.every", "1000"),
        ("checkpoint.every", "0"),
    ]
    result = train(load_config(None, overrides), tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    train_cpu = [r["cpu_s"] for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert 1 <= result.step < 10000
    assert train_cpu[-1] >= 0.2 and train_cpu == sorted(train_cpu)
    assert [e["step"] for e in evals] == [0, result.step]  # the budget's end is evaluated
    assert evals[-1]["cpu_s"] == train_cpu[-1] and evals[-1]["tokens"] == result.step * 4 * 32


@pytest.mark.slow
def test_the_whole_benchmark_on_a_tiny_model(tiny_dataset, tmp_path):
    """Calibration, sweep, interleaved repeats, table, JSON and PNG, through real trainer
    processes with CPU budgets of a fraction of a second."""
    config = tmp_path / "tiny.toml"
    config.write_text(
        "[model]\n"
        + "".join(f"{k.split('.')[1]} = {v}\n" for k, v in TINY_MODEL[:-1])
        + "[data]\nseq_len = 32\n"
    )
    argv = [
        "--config", str(config), "--data", str(tiny_dataset), "--out", str(tmp_path / "runs"),
        "--budget-s", "0.4", "--sweep-budget-s", "0.2", "--repeats", "2", "--batch-size", "4",
        "--lrs-a", "3e-3", "--lrs-b", "0.02,0.04", "--lrs-c", "0.02", "--evals", "3",
        "--eval-batches", "1", "--png", str(tmp_path / "curves.png"),
        "--json", str(tmp_path / "results.json"), "--quiet",
    ]  # fmt: skip
    assert bench.main(argv) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert [r["arm"] for r in report["rows"]] == ["a", "b", "c"]
    assert [lr for lr, _ in report["sweep"]["b"]] == [0.02, 0.04]
    for row in report["rows"]:
        assert len(row["final_bpb"]) == 2 and row["spread"] >= 0
        assert all(cpu >= 0.4 or steps > 0 for cpu, steps in zip(row["cpu_s"], row["steps"]))
    assert report["rows"][0]["ratio"] == pytest.approx(1.0, abs=0.5)
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert "WINS" in report["verdict"] or "does not win" in report["verdict"]
