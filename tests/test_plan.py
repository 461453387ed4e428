"""``pretrain plan`` and ``--train.dry_run``: the per-GPU figures of real configs on clusters
this machine does not have, checked against counts made here independently of the plan.

The plan reads its parameter and optimizer figures from the shards parallelize produces; the
tests recount them from a plain meta-device model and the layout the mesh implies (each
parameter split over ``dp_shard`` ranks, and over ``tp`` ranks too when tensor parallel splits
it). The collectives are measured by the plan; the test derives FSDP's counts from the number
of blocks. The dry run's optimizer states, measured after a real step on fake tensors, are
compared with the plan's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from pretrain import cli
from pretrain.config import load_config
from pretrain.model import Transformer
from pretrain.plan import make_plan
from pretrain.train import train

# Parameters tensor parallel splits over the tp ranks (Megatron's column and row splits and
# the vocabulary-split embedding); norms and the head stay whole on every tp rank.
TP_SPLIT = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
            "embed_tokens")  # fmt: skip


def independent_parameter_bytes(config, world_size: int) -> float:
    """Bytes of fp32 parameters one rank holds: each one's numel over the ranks it is split on."""
    replicate, shard, tp = config.parallel.mesh_shape(world_size)
    with torch.device("meta"):
        model = Transformer(config.model)
    total = 0.0
    for name, p in model.named_parameters():
        ways = shard * (tp if any(k in name for k in TP_SPLIT) else 1)
        total += p.numel() * 4 / ways
    return total


def check_against_independent_count(plan, config, world_size: int) -> None:
    expected = independent_parameter_bytes(config, world_size)
    params = plan.memory_bytes("parameters")
    assert params == pytest.approx(expected, rel=0.02)
    assert plan.memory_bytes("gradients") == pytest.approx(expected, rel=0.02)
    # AdamW: two fp32 states per element of the shards
    assert plan.memory_bytes("optimizer states") == pytest.approx(2 * expected, rel=0.02)
    with torch.device("meta"):
        assert plan.n_params == Transformer(config.model).num_params()


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plan_8b():
    config = load_config(ROOT / "configs" / "llama-8b.toml")
    start = time.perf_counter()
    plan = make_plan(config, 64, gpu_memory_gib=80, config_name="llama-8b")
    return config, plan, time.perf_counter() - start


def test_llama_8b_on_64_gpus_agrees_with_an_independent_count(plan_8b):
    config, plan, seconds = plan_8b
    assert seconds < 60
    assert plan.mesh == {"dp_replicate": 8, "dp_shard": 8, "tp": 1}
    check_against_independent_count(plan, config, 64)
    assert plan.fits and plan.headroom_bytes > 0


def test_llama_8b_collectives_are_those_of_hsdp(plan_8b):
    """Per step: FSDP gathers every block and the root per micro-batch and the resharded
    blocks (all but the last) again for backward; gradients are reduce-scattered and
    all-reduced across replicas once per block and root (after the last micro-batch)."""
    config, plan, _ = plan_8b
    calls = {(c.name.split(" (")[0], c.group): c.calls for c in plan.collectives}
    L, accum = config.model.n_layers, plan.grad_accum
    assert accum == 8
    assert calls[("all-gather", "dp_shard")] == accum * (L + 1) + accum * (L - 1)
    assert calls[("reduce-scatter", "dp_shard")] == L + 1
    assert calls[("all-reduce", "dp_replicate")] == L + 1
    assert not any(c.group == "tp" for c in plan.collectives)
    gathered = next(c for c in plan.collectives if c.name.startswith("all-gather"))
    # bf16 parameters: the gathers of one micro-batch total the model once (forward) plus the
    # resharded blocks (backward), each sent (n-1)/n by every rank
    per_micro = gathered.traffic / accum / (7 / 8)
    assert per_micro == pytest.approx(2 * plan.n_params * 2, rel=0.1)


@pytest.mark.slow
def test_llama_70b_on_256_gpus_agrees_with_an_independent_count(root):
    config = load_config(root / "configs" / "llama-70b.toml")
    start = time.perf_counter()
    plan = make_plan(config, 256, gpu_memory_gib=80)
    assert time.perf_counter() - start < 60
    assert plan.mesh == {"dp_replicate": 1, "dp_shard": 32, "tp": 8}
    check_against_independent_count(plan, config, 256)
    assert plan.fits
    assert {c.group for c in plan.collectives} >= {"dp_shard", "tp"}
    # and selective AC under TP: the recompute reruns no reduce-scatter (a small model's plan)
    selective = small_config(root, *TP_OVERRIDES, "--train.activation_checkpointing", "selective")
    check_tensor_parallel_collectives(make_plan(selective, 256), selective)


def test_plan_json_and_a_plan_that_does_not_fit(root, capsys):
    rc = cli.main(["plan", "--config", str(root / "configs" / "tiny.toml"), "--world-size",
                   "4", "--gpu-memory", "1", "--json", "--train.global_batch_size", "32"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    # 1 GiB cannot hold the 4 GiB runtime reserve: the exit status says so
    assert rc == 1 and out["fits"] is False and out["headroom_bytes"] < 0
    assert out["mesh"] == {"dp_replicate": 1, "dp_shard": 4, "tp": 1}
    names = [r["name"] for r in out["memory"]]
    assert names[:3] == ["parameters", "gradients", "accumulated gradients"]
    assert sum(r["bytes"] for r in out["memory"]) == out["total_bytes"]


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "--world-size", "64", "--parallel.tp", "3"],
        ["plan", "--world-size", "64", "--parallel.dp_shard", "3", "--parallel.tp", "2"],
    ],
)
def test_a_wrong_mesh_product_is_one_line(root, capsys, argv):
    rc = cli.main([*argv, "--config", str(root / "configs" / "tiny.toml")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "parallel." in err and "64" in err
    assert "Traceback" not in err


def small_config(root, *overrides):
    return load_config(
        root / "configs" / "tiny.toml",
        ["--model.n_layers", "2", "--model.d_model", "64", "--model.n_heads", "4",
         "--model.n_kv_heads", "2", "--model.vocab_size", "512", "--data.seq_len", "32",
         "--train.micro_batch_size", "1", *overrides],
    )  # fmt: skip


TP_OVERRIDES = ["--parallel.dp_replicate", "2", "--parallel.tp", "2",
                "--train.global_batch_size", "256"]  # fmt: skip


def test_dry_run_of_one_step_at_256_ranks(root, tmp_path, monkeypatch, capsys):
    """The trainer runs a step as rank 0 of 256 fake ranks (HSDP x TP), writes nothing, and
    the optimizer states it measures after the step are the plan's."""
    overrides = TP_OVERRIDES
    config = small_config(root, *overrides, "--train.dry_run", "true")
    monkeypatch.setenv("WORLD_SIZE", "256")
    out = tmp_path / "run"
    result = train(config, out)
    printed = capsys.readouterr().out
    assert result.state == "dry_run" and result.step == 1
    assert not out.exists()
    assert "rank 0 of 256 (mesh dp_replicate=2 x dp_shard=64 x tp=2)" in printed
    assert "ran 2 of 2 micro-batches" in printed
    states = int(printed.split(" bytes)")[0].rsplit("(", 1)[1])
    monkeypatch.delenv("WORLD_SIZE")
    plan = make_plan(small_config(root, *overrides), 256)
    assert states == plan.memory_bytes("optimizer states")
    check_tensor_parallel_collectives(plan, small_config(root, *overrides))


def check_tensor_parallel_collectives(plan, config) -> None:
    """A TP block sends its activations once per attention and once per MLP each way: forward,
    an all-gather into q/k/v (gate/up) and a reduce-scatter out of o (down); backward, the
    reverse. The input gradients of q/k/v (gate/up) add up before one reduce-scatter; an
    all-reduce per product (five per block) would send five times as much. The only TP
    all-reduces left are the norms' weight gradients. Selective AC keeps the reduce-scattered
    outputs (the backward's recompute sends none of them again) and reruns the two
    all-gathers."""
    m, t = config.model, config.train
    accum = config.train.global_batch_size // (t.micro_batch_size * 128)  # 2 x 64 data ranks
    tp_rows = {c.name.split(" (")[0]: c for c in plan.collectives if c.group == "tp"}
    assert t.activation_checkpointing in ("none", "selective")
    # per micro-batch: 4 per block (none in a selective recompute: the saved outputs are reused)
    # and 1 for the embedding's output (were each product to take a plain tensor, it would be 2
    # per block, and the backward's input gradients 5 all-reduces of the whole activation)
    per_block = (tp_rows["reduce-scatter"].calls / accum - 1) / m.n_layers
    backward = per_block - 2  # the forward's two: out of o and out of down
    assert backward == 2  # at most 2, and 2 it must be: one into attention, one into the MLP
    # all-gathers: 2 a block forward (into q/k/v, gate/up), 2 backward (the gradients of the
    # reduce-scatters), 2 in a selective recompute; 1 into the head, 1 for the embedding's grad
    rerun = 2 if t.activation_checkpointing == "selective" else 0
    assert tp_rows["all-gather"].calls / accum == (4 + rerun) * m.n_layers + 2
    activation_bytes = t.micro_batch_size * config.data.seq_len * m.d_model * 4
    norm_bytes = m.d_model * 4
    assert tp_rows["all-reduce"].bytes_per_call <= norm_bytes < activation_bytes
    assert tp_rows["all-reduce"].calls == 2 * m.n_layers + 1  # two norms a block, the final


def test_dry_run_refuses_a_wrong_mesh_in_one_line(root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "8")
    rc = cli.main(["train", "--config", str(root / "configs" / "tiny.toml"), "--out",
                   str(tmp_path / "run"), "--train.dry_run", "true", "--parallel.dp_shard", "3"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "parallel.dp_shard=3" in err


@pytest.mark.slow
def test_dry_run_of_llama_70b_on_256_ranks(root, tmp_path, monkeypatch, capsys):
    config = load_config(root / "configs" / "llama-70b.toml", ["--train.dry_run", "true"])
    monkeypatch.setenv("WORLD_SIZE", "256")
    result = train(config, tmp_path / "run")
    printed = capsys.readouterr().out
    assert result.state == "dry_run"
    assert "rank 0 of 256 (mesh dp_replicate=1 x dp_shard=32 x tp=8)" in printed
    assert "ran 2 of 16 micro-batches" in printed
