"""The initial weights: the init rule of pretrain.model and its options, and pretrain.initialize,
which builds them shard by shard after a meta-device model is parallelized.

The reference is the model built whole in one process. Four real gloo ranks parallelize a
meta-device model on every mesh the trainer builds (FSDP 4, HSDP 2 x 2 with (Replicate,
Shard(0)), tensor parallel 2 x FSDP 2 with (Shard(0), Shard(1)) and FSDP's strided shards over
the column splits) and must hold bitwise the reference's slices; ``init_from`` a checkpoint and
an export into those shards must equal the one-process load.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import pytest
import torch

from pretrain.config import ModelConfig, ParallelConfig
from pretrain.initialize import materialize, named_parameters
from pretrain.model import Transformer
from pretrain.tokenizer import min_vocab_size

SEED = 1234
WORLD = 4
MESHES = {
    "fsdp4": ParallelConfig(dp_shard=4),
    "hsdp2x2": ParallelConfig(dp_replicate=2, dp_shard=2),
    "tp2xfsdp2": ParallelConfig(dp_shard=2, tp=2),
}


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


def _dist_cfg(tied: bool) -> ModelConfig:
    """Sizes that 4 ranks split unevenly (vocab, MLP width), small enough to spawn quickly."""
    return _cfg(vocab_size=min_vocab_size() + 3, ffn_hidden=88, tie_embeddings=tied)


def _meta_model(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in named_parameters(model)}


# --------------------------------------------------------------------------- one process


def test_zero_init_residual_zeros_exactly_the_residual_output_projections():
    model = Transformer(_cfg(zero_init_residual=True), init_seed=0)
    zeroed = {n for n, p in model.named_parameters() if not p.any()}
    expected = {
        f"layers.{i}.{m}"
        for i in range(2)
        for m in ("self_attn.o_proj.weight", "mlp.down_proj.weight")
    }
    assert zeroed == expected
    default = Transformer(_cfg(), init_seed=0)
    assert all(p.any() for p in default.parameters())
    same = {n for n, p in default.named_parameters() if n not in expected}
    for name in same:  # every other parameter is as without the option
        assert torch.equal(model.get_parameter(name), default.get_parameter(name)), name


@pytest.mark.parametrize("tied", [False, True])
def test_a_meta_built_model_materializes_to_the_normally_built_one(tied):
    cfg = _cfg(tie_embeddings=tied)
    reference = Transformer(cfg, init_seed=SEED)
    model = materialize(_meta_model(cfg), "cpu", SEED)
    assert _state(model).keys() == _state(reference).keys()
    for name, value in _state(reference).items():
        assert torch.equal(model.get_parameter(name), value), name
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied


def test_the_init_rule_and_the_seed_decide_the_weights():
    a, b = Transformer(_cfg(), init_seed=1), Transformer(_cfg(), init_seed=2)
    assert not torch.equal(a.embed_tokens.weight, b.embed_tokens.weight)
    torch.manual_seed(3)
    c = Transformer(_cfg())
    torch.manual_seed(3)
    assert torch.equal(c.lm_head.weight, Transformer(_cfg()).lm_head.weight)  # manual_seed decides
    std = 0.02
    for name, p in a.named_parameters():
        if p.dim() == 1:
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            assert p.std().item() == pytest.approx(std / 2, rel=0.1), name  # 1/sqrt(2 n_layers)
        else:
            assert p.std().item() == pytest.approx(std, rel=0.1), name
    # Rows of one block differ from each other (no generator reused across rows or blocks).
    w = a.embed_tokens.weight
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[:32], w[32:64])


# --------------------------------------------------------------------------- four gloo ranks


def _trained(tied: bool) -> Transformer:
    return Transformer(_dist_cfg(tied), init_seed=7)  # other weights than the runs' SEED


def _loaded(path: Path, tied: bool) -> dict:
    """``path`` loaded by ``init_from`` into a one-process model: the reference for shards."""
    from pretrain.export import init_from

    model = Transformer(_dist_cfg(tied), init_seed=0)
    init_from(path, model)
    return {"path": str(path), "weights": _state(model)}


def _export_source(base: Path, tied: bool) -> dict[str, dict]:
    """A bf16 export of a one-process model, and what a one-process load of it gives."""
    from pretrain.export import write_export
    from pretrain.tokenizer import train_tokenizer

    tok = base / "tokenizer.json"
    if not tok.exists():
        train_tokenizer(["a few words of text"], min_vocab_size()).save(str(tok))
    trained = _trained(tied)
    export = write_export(
        trained.config, trained.state_dict(), tok, base / f"export-{tied}", dtype="bf16"
    )
    loaded = _loaded(export, tied)
    for name, value in _state(trained).items():  # the one-process load is the export's values
        assert torch.equal(loaded["weights"][name], value.bfloat16().float()), name
    return {f"export-{tied}": loaded}


def _checkpoint_source(base: Path, tied: bool) -> dict[str, dict]:
    """A DCP checkpoint of a one-process model, and what a one-process load of it gives."""
    import torch.distributed.checkpoint as dcp

    trained = _trained(tied)
    ckpt = base / f"ckpt-{tied}" / "step-000001"
    dcp.save({"model": trained.state_dict()}, checkpoint_id=str(ckpt), no_dist=True)
    loaded = _loaded(ckpt, tied)
    for name, value in _state(trained).items():
        assert torch.equal(loaded["weights"][name], value), name
    return {f"checkpoint-{tied}": loaded}


def _check_meshes(
    info, sources: dict, cases: list[tuple[bool, str, list[str]]], *, full: bool
) -> dict[str, dict]:
    """On this rank, for each (tied, source, meshes) of ``cases``: parallelize a meta
    model, materialize it (``source`` "init") or also ``init_from`` a checkpoint or export, and
    name the parameters whose local shard (and, with ``full``, gathered tensor) differs from
    the one-process reference."""
    from torch.distributed.tensor import distribute_tensor

    from pretrain.export import init_from
    from pretrain.parallel import build_mesh, parallelize

    results: dict[str, dict] = {}
    meshes = {name: build_mesh(info, pcfg) for name, pcfg in MESHES.items()}
    for tied, source, mesh_names in cases:
        cfg = _dist_cfg(tied)
        if source == "init":
            reference = _state(Transformer(cfg, init_seed=SEED))
        else:
            reference = sources[f"{source}-{tied}"]["weights"]
        for mesh_name in mesh_names:
            pcfg = MESHES[mesh_name]
            model = parallelize(_meta_model(cfg), info, pcfg, mesh=meshes[mesh_name])
            materialize(model, "cpu", SEED)
            if source != "init":
                init_from(sources[f"{source}-{tied}"]["path"], model)
            local_diff, full_diff, placements = [], [], set()
            for name, p in named_parameters(model):
                want = distribute_tensor(
                    reference[name], p.device_mesh, p.placements, src_data_rank=None
                )
                if not torch.equal(p.to_local(), want.to_local()):
                    local_diff.append(name)
                if full and not torch.equal(p.full_tensor(), reference[name]):
                    full_diff.append(name)
                placements.add(" ".join(type(x).__name__ + f"({getattr(x, 'dim', '')})"
                                        for x in p.placements))  # fmt: skip
            results[f"{mesh_name}/{source}/tied={tied}"] = {
                "local_diff": local_diff,
                "full_diff": full_diff,
                "placements": sorted(placements),
                "tied": model.lm_head.weight is model.embed_tokens.weight,
            }
    return results


def _info(rank: int):
    from pretrain.parallel import DistInfo

    return DistInfo(rank=rank, local_rank=rank, world_size=WORLD, device=torch.device("cpu"))


def _worker(rank: int, store: str, out: str, sources: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    cases = [
        (tied, s, list(MESHES)) for tied in (False, True) for s in ("init", "checkpoint", "export")
    ]
    try:
        results = _check_meshes(_info(rank), sources, cases, full=True)
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def test_each_rank_of_four_fills_its_own_slices_under_a_fake_process_group(tmp_path):
    """Every rank of every mesh, in this process (a fake backend: no collective carries data):
    each local shard is bitwise the reference's slice, for the seeded init and an export."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    sources = _export_source(tmp_path, tied=False)
    for rank in range(WORLD):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=WORLD)
        try:
            cases = [
                (False, "init", list(MESHES)),
                (True, "init", ["fsdp4"]),
                (False, "export", ["tp2xfsdp2"]),
            ]
            results = _check_meshes(_info(rank), sources, cases, full=False)
        finally:
            dist.destroy_process_group()
        for key, r in results.items():
            assert r["local_diff"] == [] and r["tied"] == ("tied=True" in key), (rank, key, r)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> dict[str, dict]:
    import torch.multiprocessing as mp

    base = tmp_path_factory.mktemp("init-4-ranks")
    sources = {}
    for tied in (False, True):
        sources.update(_export_source(base, tied) | _checkpoint_source(base, tied))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(base / "store"), str(base), sources), nprocs=WORLD, join=True)
    per_rank = [json.loads((base / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return {key: [ranks[key] for ranks in per_rank] for key in per_rank[0]}


@pytest.mark.slow
@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("source", ["init", "checkpoint", "export"])
@pytest.mark.parametrize("tied", [False, True])
def test_every_mesh_holds_bitwise_the_one_process_weights(four_ranks, mesh, source, tied):
    ranks = four_ranks[f"{mesh}/{source}/tied={tied}"]
    for rank, r in enumerate(ranks):
        assert r["local_diff"] == [] and r["full_diff"] == [], (rank, r)
        assert r["tied"] == tied, rank


@pytest.mark.slow
def test_the_meshes_cover_every_placement_kind(four_ranks):
    seen = {p for key, ranks in four_ranks.items() for r in ranks for p in r["placements"]}
    assert "Shard(0)" in seen  # FSDP 4
    assert "Replicate() Shard(0)" in seen  # HSDP 2 x 2
    assert "Shard(0) Shard(1)" in seen  # FSDP over tensor parallel's row splits
    assert any(p.startswith("_StridedShard(0)") for p in seen), seen  # ... over its column splits


# --------------------------------------------------------------------------- start-up memory


def _start_up(rank: int, world: int, store: str, out: str, cfg: ModelConfig) -> None:
    """Build on meta, shard, materialize and initialize ``cfg`` as the trainer does; record this
    process's peak RSS and the time it took."""
    import torch.distributed as dist

    from pretrain.parallel import DistInfo, build_mesh, parallelize

    torch.set_num_threads(1)
    start = time.perf_counter()
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    info = DistInfo(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"))
    pcfg = ParallelConfig()
    model = parallelize(_meta_model(cfg), info, pcfg, mesh=build_mesh(info, pcfg))
    materialize(model, "cpu", SEED)
    seconds = time.perf_counter() - start
    if world > 1:
        dist.destroy_process_group()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(out, f"{world}-{rank}.json").write_text(json.dumps({"rss_kb": peak_kb, "s": seconds}))


@pytest.mark.slow
def test_two_ranks_start_with_well_under_the_memory_of_one_process(tmp_path):
    """A ~0.5B-parameter model built, sharded and initialized: peak RSS per rank of 2 <= 0.6 x
    that of one process (each rank holds its half plus one noise block)."""
    import torch.multiprocessing as mp

    cfg = ModelConfig(
        vocab_size=32768, n_layers=18, d_model=1280, n_heads=10, n_kv_heads=5, ffn_hidden=5120
    )
    n = Transformer.num_params(_meta_model(cfg))
    assert 0.4e9 < n < 0.6e9
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_start_up, args=(1, "", str(tmp_path), cfg), nprocs=1, join=True)
    mp.spawn(_start_up, args=(2, str(tmp_path / "store"), str(tmp_path), cfg), nprocs=2, join=True)
    one = json.loads((tmp_path / "1-0.json").read_text())
    two = [json.loads((tmp_path / f"2-{r}.json").read_text()) for r in range(2)]
    print(f"{n / 1e9:.2f}B params: 1 process {one}, 2 ranks {two}")
    for r in two:
        assert r["rss_kb"] <= 0.6 * one["rss_kb"], (one, two)
