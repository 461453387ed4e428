"""The N-D device mesh on 4 real torchrun ranks (gloo, CPU): FSDP 4, HSDP 2x2 and tensor +
sequence parallel 2 x FSDP 2 train like one process, and a DCP checkpoint saved at one mesh
resumes at the next (FSDP 4 -> HSDP 2x2 -> TP 2 x FSDP 2 -> 1 process) with the same losses.

One torchrun launch runs every mesh in sequence (this file is also the worker: ``python -m
torch.distributed.run ... tests/test_mesh.py OUT``); the one-process references run in the test
process. Every layout builds the model on the meta device and initializes its shards
(``pretrain.initialize.materialize``), and must start from the one-process weights bitwise. The
batches are fixed, the same global batch on every layout, each data-parallel rank taking its rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
GLOBAL_BATCH, MICRO_BATCH, SEQ = 8, 2, 32
MESHES = {  # name: (dp_replicate, dp_shard, tp, optimizer)
    "hsdp2x2": (2, 2, 1, "adamw"),
    "tp2_fsdp2": (1, 2, 2, "adamw"),
    "fsdp4": (1, 4, 1, "adamw"),
    "hsdp2x2_muon": (2, 2, 1, "muon"),
    "tp2_fsdp2_muon": (1, 2, 2, "muon"),
}
DEFAULT_MESHES = ["tp2_fsdp2"]  # one launch in the default suite; the rest are slow
SELECTIVE_AC = {"tp2_fsdp2"}  # trained under selective activation checkpointing, the rest none
SLOW_MESHES = [name for name in MESHES if name not in DEFAULT_MESHES]
RESUME_CHAIN = [("fsdp4", 0, 3), ("hsdp2x2", 3, 6), ("tp2_fsdp2", 6, 8)]  # then 1 process: 8-10


def _config(optimizer: str = "adamw"):
    from pretrain.config import Config

    config = Config()
    m = config.model
    m.vocab_size, m.n_layers, m.d_model, m.n_heads, m.n_kv_heads = 512, 2, 32, 4, 2
    m.max_seq_len = SEQ
    config.data.seq_len = SEQ
    t = config.train
    t.steps, t.warmup_steps, t.lr, t.grad_clip = STEPS, 2, 3e-3, 1.0
    t.global_batch_size, t.micro_batch_size = GLOBAL_BATCH, MICRO_BATCH
    config.optimizer.name = optimizer
    return config


def _batch(step: int, dp_rank: int, dp_size: int):
    """Rows of global batch ``step`` for one data-parallel rank (the same tokens everywhere):
    counting sequences with a random start and stride, which the model learns within the steps."""
    from pretrain.data.loader import Batch

    gen = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, 512, (GLOBAL_BATCH, 1), generator=gen)
    stride = torch.randint(1, 4, (GLOBAL_BATCH, 1), generator=gen)
    tokens = (start + stride * torch.arange(SEQ + 1)) % 512
    rows = slice(dp_rank * GLOBAL_BATCH // dp_size, (dp_rank + 1) * GLOBAL_BATCH // dp_size)
    return Batch(tokens[rows, :-1], tokens[rows, 1:])


def _optimizer(model, config):
    """kernels.AdamW (the project's, on each local shard) or kernels.Muon."""
    import kernels
    from pretrain.optim import build_optimizer, param_groups

    if config.optimizer.name == "muon":
        return build_optimizer(model, config, torch.device("cpu"))
    opt = config.optimizer
    groups = param_groups(model, opt.weight_decay)
    return kernels.AdamW(groups, lr=config.train.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)


def _build(config, dist_info, parallel, ac: str = "none"):
    """The trainer's way: built on the meta device, parallelized, then each rank's shards
    initialized (the same weights on every mesh)."""
    from pretrain.initialize import materialize
    from pretrain.model import Transformer
    from pretrain.parallel import parallelize

    with torch.device("meta"):
        model = Transformer(config.model)
    model = parallelize(model, dist_info, parallel, activation_checkpointing=ac)
    materialize(model, dist_info.device, seed=0)
    return model, _optimizer(model, config)


def _train(model, optimizer, config, dist_info, parallel, steps: range) -> dict[int, float]:
    from pretrain.optim import lr_at
    from pretrain.parallel import data_parallel_rank
    from pretrain.train import train_step

    dp_rank, dp_size = data_parallel_rank(dist_info, parallel)
    tp = parallel.mesh_shape(dist_info.world_size)[2]
    out = {}
    for step in steps:
        stats = train_step(
            model, optimizer, _batch(step, dp_rank, dp_size), step=step + 1,
            lr=lr_at(step, config.train), micro_batch_size=MICRO_BATCH,
            world_size=dist_info.world_size, grad_clip=config.train.grad_clip,
            device=dist_info.device, tp_size=tp,
        )  # fmt: skip
        out[step + 1] = (stats.loss, stats.grad_norm)
    return out


def _full_weights(model) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True)
    return {k: v.clone() for k, v in get_model_state_dict(model, options=opts).items()}


def _save(model, optimizer, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path))


def _load(model, optimizer, path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from pretrain.checkpoint import dcp_load

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp_load(state, path)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])  # fmt: skip


def _worker(out_dir: Path, meshes: list[str], chain: bool) -> None:
    """Each of ``meshes`` for STEPS steps, then (``chain``) the resume chain; rank 0 writes
    results.json."""
    import torch.distributed as dist

    from pretrain.config import ParallelConfig
    from pretrain.parallel import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    dist_info = init_distributed("cpu")
    results: dict = {"losses": {}, "initial_equal": {}, "muon_split": {}}
    reference = _full_weights(_build(_config(), _one_process(), ParallelConfig())[0])
    for name in meshes:
        rep, shard, tp, opt = MESHES[name]
        started = time.perf_counter()
        parallel = ParallelConfig(dp_replicate=rep, dp_shard=shard, tp=tp)
        config = _config(opt)
        ac = "selective" if name in SELECTIVE_AC else "none"
        model, optimizer = _build(config, dist_info, parallel, ac)
        initial = _full_weights(model)
        results["initial_equal"][name] = all(
            torch.equal(initial[k], reference[k]) for k in reference
        )
        results["losses"][name] = _train(model, optimizer, config, dist_info, parallel,
                                         range(STEPS))  # fmt: skip
        if opt == "muon":
            results["muon_split"][name] = _muon_split(optimizer)
        if dist_info.is_main:
            print(f"{name}: {time.perf_counter() - started:.1f} s", flush=True)
    losses = {}
    for i, (name, start, stop) in enumerate(RESUME_CHAIN if chain else []):
        rep, shard, tp, opt = MESHES[name]
        parallel = ParallelConfig(dp_replicate=rep, dp_shard=shard, tp=tp)
        config = _config(opt)
        model, optimizer = _build(config, dist_info, parallel)
        if i > 0:
            _load(model, optimizer, out_dir / f"ckpt-{start}")
        losses.update(_train(model, optimizer, config, dist_info, parallel, range(start, stop)))
        _save(model, optimizer, out_dir / f"ckpt-{stop}")
    results["chain"] = losses
    dist.barrier()
    if dist_info.is_main:
        tmp = out_dir / "results.json.tmp"
        tmp.write_text(json.dumps(results))
        tmp.rename(out_dir / "results.json")
    destroy_distributed()


def _muon_split(optimizer) -> dict:
    """The number of Muon matrices and how many of them each rank orthogonalized (all steps)."""
    import torch.distributed as dist

    counts: list = [None] * dist.get_world_size()
    dist.all_gather_object(counts, optimizer.matrices_orthogonalized)
    matrices = sum(len(g["params"]) for g in optimizer.param_groups if g["use_muon"])
    return {"matrices": matrices, "per_rank": counts}


def _one_process():
    from pretrain.parallel import DistInfo

    return DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


# --------------------------------------------------------------------------- tests


def _launch(out: Path, meshes: list[str], chain: bool) -> dict:
    """One torchrun launch of 4 ranks running the worker below; its results.json."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
        str(Path(__file__).resolve()), str(out), ",".join(meshes), *(["--chain"] if chain else []),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("mesh"), DEFAULT_MESHES, chain=False)


@pytest.fixture(scope="module")
def slow_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh-slow")
    return out, _launch(out, SLOW_MESHES, chain=True)


@pytest.fixture(scope="module")
def reference_losses():
    """One plain process: the uninterrupted run of an optimizer (run once, when first asked)."""
    from pretrain.config import ParallelConfig

    runs: dict[str, dict] = {}

    def losses(opt: str) -> dict:
        if opt not in runs:
            config = _config(opt)
            model, optimizer = _build(config, _one_process(), ParallelConfig())
            one = _one_process()
            runs[opt] = _train(model, optimizer, config, one, ParallelConfig(), range(STEPS))
        return runs[opt]

    return losses


def _assert_close(reference: dict[int, tuple], got: dict, norm_rtol: float = 1e-4) -> None:
    """Per-step losses within 1e-5 relative of the reference, gradient norms (before clipping;
    a wrong reduction over the mesh is off by a factor) within ``norm_rtol``: another summation
    order moves a norm more than the loss it came from (Muon's bf16 iteration rounds the
    difference up to whole bf16 steps, hence 1e-3 there)."""
    got = {int(k): tuple(v) for k, v in got.items()}
    assert sorted(got) == sorted(reference)
    for step, (loss, norm) in reference.items():
        assert got[step][0] == pytest.approx(loss, rel=1e-5), ("loss", step, got[step], loss)
        assert got[step][1] == pytest.approx(norm, rel=norm_rtol), ("norm", step, got[step], norm)


def _check_mesh(results: dict, reference: dict, name: str) -> None:
    assert results["initial_equal"][name], "the sharded model does not start from the same weights"
    optimizer = MESHES[name][3]
    norm_rtol = 1e-3 if optimizer == "muon" else 1e-4
    _assert_close(reference(optimizer), results["losses"][name], norm_rtol)
    if optimizer == "muon":
        _assert_muon_work_is_split(results["muon_split"][name], name)


def _assert_muon_work_is_split(split: dict, name: str) -> None:
    """Each replica group ran the iteration once per matrix and step, and each of its
    dp_shard x tp ranks only on its round-robin share (a rank doing them all fails)."""
    replicas, shard, tp, _ = MESHES[name]
    group = shard * tp
    n = split["matrices"]
    assert n > group, split
    assert sum(split["per_rank"]) == replicas * n * STEPS, split
    assert max(split["per_rank"]) == -(-n // group) * STEPS, split
    assert min(split["per_rank"]) == n // group * STEPS, split


@pytest.mark.parametrize("name", DEFAULT_MESHES)
def test_mesh_trains_like_one_process(default_runs, reference_losses, name):
    _check_mesh(default_runs, reference_losses, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_MESHES)
def test_more_meshes_train_like_one_process(slow_runs, reference_losses, name):
    _check_mesh(slow_runs[1], reference_losses, name)


@pytest.mark.slow
def test_checkpoint_resumes_across_meshes_then_in_one_process(slow_runs, reference_losses):
    """FSDP 4 -> HSDP 2x2 -> TP 2 x FSDP 2 (in the launch) -> one process (here)."""
    from pretrain.config import ParallelConfig

    out, results = slow_runs
    chain = {int(k): v for k, v in results["chain"].items()}
    config = _config()
    model, optimizer = _build(config, _one_process(), ParallelConfig())
    _load(model, optimizer, out / f"ckpt-{RESUME_CHAIN[-1][2]}")
    chain.update(_train(model, optimizer, config, _one_process(), ParallelConfig(),
                        range(RESUME_CHAIN[-1][2], STEPS)))  # fmt: skip
    _assert_close(reference_losses("adamw"), chain)


@pytest.mark.slow
def test_trainer_resumes_across_meshes(tiny_dataset, tmp_path):
    """``pretrain.train`` itself, with ``--parallel.*``: FSDP 4 (steps 1-3) -> HSDP 2x2 (4-6) ->
    TP 2 x FSDP 2 (7-8) -> one process (9-10), through its checkpoints, against one
    uninterrupted process: the data ranks, batch checks and token counts of the trainer."""
    from train_helpers import assert_losses_close, losses, run_train

    steps = ["--train.steps", "10", "--checkpoint.every", "100", "--eval.every", "0",
             "--train.micro_batch_size", "2"]  # fmt: skip
    run_train(tiny_dataset, tmp_path / "one", *steps)
    run = tmp_path / "chain"
    legs = [
        (["--parallel.dp_shard", "4"], 3, 4),
        (["--parallel.dp_replicate", "2", "--parallel.dp_shard", "2"], 6, 4),
        (["--parallel.dp_shard", "2", "--parallel.tp", "2"], 8, 4),
        ([], 10, 1),
    ]
    for i, (mesh, stop, nproc) in enumerate(legs):
        resume = ["--checkpoint.resume", "auto"] if i else []
        run_train(tiny_dataset, run, *steps, *mesh, *resume, "--train.stop_at", str(stop),
                  nproc=nproc)  # fmt: skip
    resumed = losses(run)
    assert sorted(resumed) == list(range(1, 11))
    assert_losses_close(losses(tmp_path / "one"), resumed, rtol=1e-5)


def test_fsdp_knobs_and_a_3d_mesh_under_a_fake_process_group():
    """``parallelize`` of a meta-device model on HSDP 2 x 1 x TP 2 under the fake backend (no
    collective runs): the reshard policy of each FSDP2 group, the reduce dtype, and q_proj split
    over all three mesh dims (replicated, FSDP rows, tensor-parallel rows)."""
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from pretrain.config import ParallelConfig
    from pretrain.model import Transformer
    from pretrain.parallel import DistInfo, parallelize

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        info = DistInfo(rank=0, local_rank=0, world_size=4, device=torch.device("cpu"))
        expected = {"default": [True, False], "always": [True, True], "never": [False, False]}
        for policy, blocks in expected.items():
            with torch.device("meta"):
                model = Transformer(_config().model)
            parallel = ParallelConfig(dp_replicate=2, dp_shard=1, tp=2, reduce_dtype="bf16",
                                      reshard_after_forward=policy)  # fmt: skip
            parallelize(model, info, parallel)
            groups = [block._get_fsdp_state()._fsdp_param_group for block in model.layers]
            assert [g.post_forward_mesh_info is not None for g in groups] == blocks, policy
            assert groups[0].mp_policy.reduce_dtype == torch.bfloat16
            weight = model.layers[0].self_attn.q_proj.weight
            assert weight.device.type == "meta" and weight.device_mesh.ndim == 3
            assert weight.placements[0] == Replicate() and weight.placements[2] == Shard(0)
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_refuses_heads_it_cannot_split():
    from pretrain.config import ConfigError, ParallelConfig
    from pretrain.model import Transformer
    from pretrain.parallel import DistInfo, parallelize

    config = _config()
    config.model.n_heads, config.model.n_kv_heads = 4, 1  # GQA: one kv head for 2 tp ranks
    info = DistInfo(rank=0, local_rank=0, world_size=4, device=torch.device("cpu"))
    with torch.device("meta"):
        model = Transformer(config.model)
    with pytest.raises(ConfigError, match=r"model.n_kv_heads=1 is not divisible by parallel.tp=2"):
        parallelize(model, info, ParallelConfig(dp_shard=2, tp=2))  # refused before any mesh
    config.model.n_kv_heads = 2
    info.world_size = 8
    with pytest.raises(ConfigError, match=r"model.n_heads=4 is not divisible by parallel.tp=8"):
        parallelize(model, info, ParallelConfig(dp_shard=1, tp=8))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2].split(","), chain="--chain" in sys.argv[3:])


# --------------------------------------------------------------------------- selective AC


def _attention_launches(mode: str, monkeypatch) -> tuple[int, int, dict]:
    """(forward launches of our attention kernel in the forward pass, in the backward pass,
    gradients) for a one-block model under activation checkpointing ``mode``."""
    import importlib

    import kernels
    from pretrain.model import Transformer
    from pretrain.parallel import apply_activation_checkpointing

    attn = importlib.import_module("kernels.attention")  # the module, not the op
    calls = []
    launch = attn._flash_forward

    def counted(*args, **kwargs):
        calls.append(1)
        return launch(*args, **kwargs)

    monkeypatch.setattr(attn, "_flash_forward", counted)
    config = _config().model
    config.vocab_size, config.n_layers, config.max_seq_len = 64, 1, 16
    config.n_heads, config.n_kv_heads = 2, 1  # head dim 16: the interpreter's smallest
    torch.manual_seed(0)
    model = Transformer(config)
    apply_activation_checkpointing(model, mode)
    idx = torch.randint(0, 64, (1, 16))
    with kernels.backend("triton"):
        loss = model(idx, idx.roll(-1, 1))
        forward = len(calls)
        loss.backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
             for n, p in model.named_parameters()}  # fmt: skip
    return forward, len(calls) - forward, grads


def test_selective_checkpointing_saves_our_attention(monkeypatch):
    """Selective AC keeps the output of kernels' attention op (no second launch in the backward);
    full AC recomputes it (an exact replay), and selective AC gives the same gradients."""
    selective = _attention_launches("selective", monkeypatch)
    full = _attention_launches("full", monkeypatch)
    assert selective[:2] == (1, 0)
    assert full[:2] == (1, 1)
    assert selective[2].keys() == full[2].keys()
    for name, grad in full[2].items():
        torch.testing.assert_close(selective[2][name], grad, rtol=1e-5, atol=1e-6)
