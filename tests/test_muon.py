"""The Newton–Schulz kernels against float64, and kernels.Muon against torch.optim.Muon.

The kernels run in the Triton interpreter on CPU tensors (fp32 operands unless a test says bf16,
which the interpreter upcasts). Muon's semantics (momentum, Nesterov, decoupled weight decay, the
shape-dependent learning rate) are checked exactly against torch.optim.Muon with its iteration
swapped for a float64 one; its bf16 iteration is compared with a tolerance derived from how far
torch's own bf16 step is from the exact one.
"""

import copy
import importlib

import pytest
import torch
import torch.nn as nn

from kernels import Muon
from kernels.newton_schulz import newton_schulz, newton_schulz_reference

# The package exports functions named like these modules, so import the modules by name.
ns = importlib.import_module("kernels.newton_schulz")
muon_module = importlib.import_module("kernels.muon")
try:
    torch_muon = importlib.import_module("torch.optim._muon")
except ImportError:  # torch.optim.Muon arrived in torch 2.9; the kernel tests run without it
    torch_muon = None
needs_torch_muon = pytest.mark.skipif(torch_muon is None, reason="torch.optim.Muon is missing")
A, B, C = ns.DEFAULT_COEFFICIENTS


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the kernels write starts as NaN, so an element left unwritten shows."""
    monkeypatch.setattr(ns, "_new_buffer", lambda *a, **k: torch.full(*a, float("nan"), **k))


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


# --------------------------------------------------------------------------- the kernels


def _check_one_iteration(x: torch.Tensor, kernel_coefficients=(A, B, C), rtol=1e-6) -> None:
    """Each kernel of one step against float64: A = X Xᵀ, S = bA + cA², X' = aX + SX.

    The kernels take zero-padded tiles; the padding must stay exactly zero through the step.
    """
    a, b, c = kernel_coefficients
    m, n = x.shape[1:]
    xp = ns.pad(x)
    assert xp.shape[1] % ns.INTERPRET_BLOCK == 0 and xp.shape[2] % ns.INTERPRET_BLOCK == 0
    gram = ns.sym_gram(xp)
    s = ns.sym_gram(gram, gram, alpha=c, beta=b)
    nxt = ns.ns_update(xp, s, a)
    x64 = x.double()
    gram64 = x64 @ x64.mT
    s64 = B * gram64 + C * gram64 @ gram64
    assert torch.equal(gram, gram.mT) and torch.equal(s, s.mT)  # mirrored tiles, bit for bit
    assert _rel_err(gram[:, :m, :m], gram64) <= rtol
    assert _rel_err(s[:, :m, :m], s64) <= rtol
    assert _rel_err(nxt[:, :m, :n], A * x64 + s64 @ x64) <= rtol
    for padded, rows, cols in ((gram, m, m), (s, m, m), (nxt, m, n)):
        assert padded[:, rows:].abs().sum() == 0 and padded[:, :, cols:].abs().sum() == 0


@pytest.mark.parametrize("shape", [(2, 40, 70), (1, 33, 97), (3, 16, 16)])
def test_each_kernel_of_one_iteration_matches_float64(shape, poisoned):
    """Ragged sizes (not multiples of the 32-wide interpreter tile), batch > 1, NaN-filled outputs."""
    torch.manual_seed(0)
    x = ns._normalized(torch.randn(shape), 1e-7, torch.float32)
    _check_one_iteration(x)


def test_a_deliberate_error_is_caught(monkeypatch, poisoned):
    """A skipped tile (left NaN) and a coefficient off by 1e-3 both fail the one-step check."""
    torch.manual_seed(0)
    x = ns._normalized(torch.randn(2, 40, 70), 1e-7, torch.float32)
    with pytest.raises(AssertionError):
        _check_one_iteration(x, kernel_coefficients=(A, B, C + 1e-3))
    real = ns._lower_tiles.__wrapped__
    monkeypatch.setattr(ns, "_lower_tiles", lambda n, device: real(n, device)[:-1])
    with pytest.raises(AssertionError):
        _check_one_iteration(x)


@pytest.mark.parametrize("shape", [(2, 40, 50), (2, 50, 40)])  # wide, and tall (transposed)
def test_five_steps_match_float64(shape, poisoned):
    torch.manual_seed(1)
    g = torch.randn(shape)
    want = newton_schulz_reference(g.double(), dtype=torch.float64)
    got = newton_schulz(g, dtype=torch.float32, backend="triton")
    assert got.shape == g.shape and got.dtype == torch.float32
    assert _rel_err(got, want) <= 1e-5
    # What the iteration is for: singular values pushed from a wide spread into about [0.7, 1.2].
    assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 5
    sv = torch.linalg.svdvals(want)
    assert 0.6 < sv.min() and sv.max() < 1.25


def test_bf16_iteration_is_as_close_to_float64_as_torch_bf16(poisoned):
    """bf16 operands (rounded by the interpreter's truncating cast): within 2x of the error of
    the same iteration in PyTorch's bf16 matmuls, a few percent of the largest entry."""
    torch.manual_seed(2)
    g = torch.randn(1, 40, 70)
    want = newton_schulz_reference(g.double(), dtype=torch.float64)
    got = newton_schulz(g, dtype=torch.bfloat16, backend="triton")
    torch_err = _rel_err(newton_schulz_reference(g, dtype=torch.bfloat16), want)
    assert got.dtype == torch.bfloat16
    assert 1e-3 < torch_err < 0.05
    assert _rel_err(got, want) <= 2 * torch_err


@needs_torch_muon
def test_reference_is_torch_muons_iteration():
    """The PyTorch path in bf16 is torch.optim.Muon's own function, up to the normalization
    (ours divides by the norm in fp32, torch's in bf16)."""
    torch.manual_seed(3)
    g = torch.randn(48, 20)
    theirs = torch_muon._zeropower_via_newtonschulz(g, (A, B, C), 5, 1e-7)
    ours = newton_schulz_reference(g)
    exact = newton_schulz_reference(g.double(), dtype=torch.float64)
    assert _rel_err(ours, theirs.double()) <= 2 * _rel_err(theirs, exact) + 1e-3
    fp32_ours = newton_schulz_reference(g, dtype=torch.float32)
    assert _rel_err(fp32_ours, exact) <= 1e-5


# --------------------------------------------------------------------------- the optimizer


def _model(seed: int = 0) -> nn.Module:
    """Three matrices of two shapes once tall ones are transposed: (40, 56) twice and (24, 40)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(40, 56), nn.Tanh(), nn.Linear(56, 40), nn.Tanh(), nn.Linear(40, 24)
    )


def _matrices(model):
    return [p for p in model.parameters() if p.ndim == 2]


def _train_together(models, optimizers, steps, seed=1):
    """Step every optimizer with the first model's gradients: the optimizers alone differ."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 40, generator=gen), torch.randn(16, 24, generator=gen)
        for opt in optimizers:
            opt.zero_grad()
        (models[0](x) - y).pow(2).mean().backward()
        for m in models[1:]:
            for p, q in zip(m.parameters(), models[0].parameters()):
                p.grad = None if q.grad is None else q.grad.clone()
        for opt in optimizers:
            opt.step()


@pytest.fixture
def exact_torch_muon(monkeypatch):
    """torch.optim.Muon with its bf16 iteration replaced by the float64 one."""
    if torch_muon is None:
        pytest.skip("torch.optim.Muon is missing")
    monkeypatch.setattr(
        torch_muon,
        "_zeropower_via_newtonschulz",
        lambda g, coefficients, steps, eps: newton_schulz_reference(
            g, steps, coefficients, eps, torch.float64
        ),
    )


def _max_diff(model_a, model_b) -> float:
    return max((p - q).abs().max().item() for p, q in zip(_matrices(model_a), _matrices(model_b)))


MUON_SETTINGS = [
    dict(lr=0.02, weight_decay=0.1, momentum=0.95),
    dict(lr=0.01, weight_decay=0.0, momentum=0.9, nesterov=False),
    dict(lr=1e-3, weight_decay=0.2, momentum=0.95, adjust_lr_fn="match_rms_adamw"),
]


@pytest.mark.parametrize("settings", MUON_SETTINGS)
def test_ten_steps_match_torch_muon_exactly_in_fp32(settings, exact_torch_muon):
    """Our PyTorch path with an fp32 iteration against torch.optim.Muon with a float64 one."""
    models = [_model(), _model()]
    opts = [
        torch.optim.Muon(_matrices(models[0]), **settings),
        Muon(_matrices(models[1]), **settings, ns_dtype=torch.float32, backend="torch"),
    ]
    _train_together(models, opts, 10)
    assert _max_diff(*models) <= 1e-6
    assert _max_diff(models[1], _model()) > 1e-3  # the run moved far beyond the tolerance


@pytest.mark.parametrize("steps", [2, pytest.param(10, marks=pytest.mark.slow)])
def test_triton_steps_match_torch_muon_exactly_in_fp32(steps, exact_torch_muon, monkeypatch):
    """The kernels (interpreter, one 64-wide tile per matrix to keep it quick) in the optimizer."""
    monkeypatch.setattr(ns, "INTERPRET_BLOCK", 64)
    settings = MUON_SETTINGS[0]
    models = [_model(), _model()]
    opts = [
        torch.optim.Muon(_matrices(models[0]), **settings),
        Muon(_matrices(models[1]), **settings, ns_dtype=torch.float32, backend="triton"),
    ]
    _train_together(models, opts, steps)
    assert _max_diff(*models) <= 1e-6


@needs_torch_muon
def test_bf16_steps_are_as_close_to_torch_muon_as_torch_muon_is_to_exact(monkeypatch):
    """Both iterate in bf16 and round differently, so they cannot agree bit for bit; ours must
    be no further from torch's bf16 run than torch's is from the exact (float64) run."""
    settings = MUON_SETTINGS[0]
    models = [_model(), _model(), _model()]
    ours = Muon(_matrices(models[0]), **settings, backend="torch")
    bf16 = torch.optim.Muon(_matrices(models[1]), **settings)
    exact = Muon(_matrices(models[2]), **settings, ns_dtype=torch.float64, backend="torch")
    _train_together(models, [ours, bf16, exact], 10)
    torch_vs_exact = _max_diff(models[1], models[2])
    assert 1e-5 < torch_vs_exact < 1e-2
    assert _max_diff(models[0], models[1]) <= 2 * torch_vs_exact
    assert ours.state[_matrices(models[0])[0]]["momentum_buffer"].dtype == torch.float32


def _groups(model):
    matrices = _matrices(model)
    rest = [p for p in model.parameters() if p.ndim < 2]
    return [
        {"params": matrices[:2], "lr": 0.02},
        {"params": matrices[2:], "lr": 0.01, "weight_decay": 0.0, "adjust_lr_fn": "original"},
        {"params": rest, "use_muon": False, "lr": 3e-3, "weight_decay": 0.0},
    ]


def test_one_optimizer_with_adamw_groups_matches_torch_muon_plus_torch_adamw(exact_torch_muon):
    """Muon groups = torch.optim.Muon; the use_muon=False group = torch.optim.AdamW."""
    models = [_model(), _model()]
    groups = _groups(models[0])
    ref = [
        torch.optim.Muon(groups[:2], weight_decay=0.1),
        torch.optim.AdamW(groups[2]["params"], lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=0),
    ]  # fmt: skip
    ours = Muon(
        _groups(models[1]),
        weight_decay=0.1,
        betas=(0.8, 0.99),
        adamw_eps=1e-7,
        ns_dtype=torch.float32,
        backend="torch",
    )
    assert [g["use_muon"] for g in ours.param_groups] == [True, True, False]
    assert ours.param_groups[2]["eps"] == 1e-7 and ours.param_groups[0]["eps"] == 1e-7
    assert ours.param_groups[2]["betas"] == (0.8, 0.99)

    class Both:
        def zero_grad(self):
            for o in ref:
                o.zero_grad()

        def step(self):
            for o in ref:
                o.step()

    _train_together(models, [Both(), ours], 10)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    state = ours.state_dict()["state"]
    assert state[0].keys() == {"momentum_buffer"}
    assert state[len(_matrices(models[1]))].keys() == {"step", "exp_avg", "exp_avg_sq"}


def test_adamw_groups_run_the_fused_kernel(monkeypatch):
    from kernels import adamw as adamw_module

    launches = []
    real = adamw_module._launch
    monkeypatch.setattr(
        muon_module, "_launch", lambda u, *r: launches.append(len(u)) or real(u, *r)
    )
    model, ref_model = _model(), _model()
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = Muon([{"params": rest, "use_muon": False}], lr=1e-2, backend="triton")
    ref = torch.optim.AdamW([p for p in ref_model.parameters() if p.ndim < 2], lr=1e-2,
                            betas=(0.9, 0.95), weight_decay=0.1)  # fmt: skip
    _train_together([ref_model, model], [ref, opt], 3)
    assert launches == [len(rest)] * 3
    for p, q in zip(rest, [p for p in ref_model.parameters() if p.ndim < 2]):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_matrices_are_batched_by_shape(monkeypatch):
    calls = []
    real = muon_module.newton_schulz
    monkeypatch.setattr(
        muon_module, "newton_schulz", lambda g, *a, **k: calls.append(tuple(g.shape)) or real(g, *a, **k)
    )  # fmt: skip
    model = _model()
    _train_together([model], [Muon(_matrices(model), backend="torch")], 1)
    assert sorted(calls) == [(1, 24, 40), (2, 40, 56)]


def test_state_dict_round_trip_and_loading_a_torch_muon_state(exact_torch_muon):
    model = _model()
    opt = Muon(_groups(model), ns_dtype=torch.float32, backend="torch")
    _train_together([model], [opt], 3)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    resumed = _model(seed=5)
    resumed.load_state_dict(saved_model)
    resumed_opt = Muon(_groups(resumed), ns_dtype=torch.float32, backend="torch")
    resumed_opt.load_state_dict(saved)
    _train_together([model, resumed], [opt, resumed_opt], 3, seed=2)
    for p, q in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)

    # A torch.optim.Muon state (no use_muon, no betas in its groups) continues identically.
    theirs_model, ours_model = _model(), _model()
    theirs = torch.optim.Muon(_matrices(theirs_model), lr=0.02)
    _train_together([theirs_model], [theirs], 2)
    ours_model.load_state_dict(theirs_model.state_dict())
    ours = Muon(_matrices(ours_model), lr=0.02, ns_dtype=torch.float32, backend="torch")
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert all(g["use_muon"] for g in ours.param_groups)
    _train_together([theirs_model, ours_model], [theirs, ours], 3, seed=3)
    assert _max_diff(theirs_model, ours_model) <= 1e-6


def test_bf16_parameters_keep_fp32_momentum_through_a_reload():
    torch.manual_seed(0)
    p = torch.randn(24, 40, dtype=torch.bfloat16, requires_grad=True)
    opt = Muon([p], lr=0.02, backend="torch")
    p.grad = torch.randn(24, 40, dtype=torch.bfloat16)
    opt.step()
    assert opt.state[p]["momentum_buffer"].dtype == torch.float32 and p.dtype == torch.bfloat16
    before = opt.state[p]["momentum_buffer"].clone()
    reloaded = Muon([p], lr=0.02, backend="torch")
    reloaded.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert torch.equal(reloaded.state[p]["momentum_buffer"], before)


def test_grad_scale_multiplies_the_gradients():
    torch.manual_seed(0)
    init, g = torch.randn(24, 40), torch.randn(24, 40)
    a, b = init.clone().requires_grad_(), init.clone().requires_grad_()
    opt_a, opt_b = Muon([a], backend="torch"), Muon([b], backend="torch")
    for _ in range(2):  # momentum mixes the scaled gradients, so the second step differs
        a.grad, b.grad = g.clone(), 0.25 * g
        opt_a.step(grad_scale=torch.tensor(0.25))
        opt_b.step()
        g = torch.randn(24, 40)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(opt_a.state[a]["momentum_buffer"], opt_b.state[b]["momentum_buffer"])


def test_rejects_what_it_does_not_implement():
    with pytest.raises(ValueError, match="2D"):
        Muon([torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match="(?i)adjust"):
        Muon([torch.zeros(3, 3, requires_grad=True)], adjust_lr_fn="spectral")
    with pytest.raises(ValueError, match="backend"):
        Muon([torch.zeros(3, 3, requires_grad=True)], backend="cuda")
    Muon([{"params": [torch.zeros(3, requires_grad=True)], "use_muon": False}])  # AdamW: any shape
    assert muon_module.adjusted_lr(1.0, "original", (40, 10)) == 2.0
    assert muon_module.adjusted_lr(1.0, "original", (10, 40)) == 1.0
    assert muon_module.adjusted_lr(1.0, "match_rms_adamw", (10, 25)) == pytest.approx(1.0)


# --------------------------------------------------------------------------- FSDP2


def _fsdp_model(seed: int = 0) -> nn.Module:
    """Odd row counts (45, 7, 24) so shards are uneven; four matrices alternate owners."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(40, 45), nn.Tanh(), nn.Linear(45, 7), nn.Tanh(), nn.Linear(7, 40),
        nn.Tanh(), nn.Linear(40, 24),
    )  # fmt: skip


def _fsdp_worker(rank: int, world_size: int, store_path: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size
    )
    try:
        for ns_dtype in (torch.bfloat16, torch.float32):
            ref_model = _fsdp_model()
            model = copy.deepcopy(ref_model)
            for layer in model[::2]:
                fully_shard(layer)
            fully_shard(model)
            assert isinstance(model[0].weight, DTensor)

            def make(m, ns_dtype=ns_dtype):
                mats = [p for p in m.parameters() if p.ndim == 2]
                rest = [p for p in m.parameters() if p.ndim < 2]
                groups = [{"params": mats}, {"params": rest, "use_muon": False, "lr": 3e-3}]
                return Muon(groups, lr=0.02, ns_dtype=ns_dtype, backend="torch")

            opt, ref_opt = make(model), make(ref_model)
            # Every rank sees the same batches, so the averaged gradient is the single-process one.
            for m, o in ((model, opt), (ref_model, ref_opt)):
                gen = torch.Generator().manual_seed(1)
                for _ in range(10):
                    x, y = torch.randn(16, 40, generator=gen), torch.randn(16, 24, generator=gen)
                    o.zero_grad()
                    (m(x) - y).pow(2).mean().backward()
                    o.step()
            for p, q in zip(model.parameters(), ref_model.parameters()):
                torch.testing.assert_close(p.full_tensor(), q, rtol=0, atol=1e-5)
            # Four matrices of four shapes: each rank ran the iteration on its share only.
            assert ref_opt.matrices_orthogonalized == 4 * 10
            assert opt.matrices_orthogonalized == 4 * 10 // world_size
            moved = (ref_model[0].weight - _fsdp_model()[0].weight).abs().max()
            assert moved > 0.05
            buf = opt.state[model[0].weight]["momentum_buffer"]
            assert isinstance(buf, DTensor) and buf.dtype == torch.float32
            torch.testing.assert_close(
                buf.full_tensor(), ref_opt.state[ref_model[0].weight]["momentum_buffer"],
                rtol=0, atol=1e-6,
            )  # fmt: skip
        # Tensor parallel's column split (Shard(1)) and FSDP's interleaved _StridedShard rows
        # (rank r holds rows of every other block): the owner, rank 0, gathers the whole matrix.
        from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
        from torch.distributed.tensor.placement_types import _StridedShard

        mesh = init_device_mesh("cpu", (world_size,))
        gen = torch.Generator().manual_seed(2)
        full_w, full_g = torch.randn(8, 6, generator=gen), torch.randn(8, 6, generator=gen)
        for placement in (Shard(1), _StridedShard(0, split_factor=2)):
            w = nn.Parameter(
                distribute_tensor(full_w.clone(), mesh, [placement], src_data_rank=None)
            )
            w.grad = distribute_tensor(full_g.clone(), mesh, [placement], src_data_rank=None)
            ref = nn.Parameter(full_w.clone())
            ref.grad = full_g.clone()
            opt = Muon([w], backend="torch")
            opt.step()
            Muon([ref], backend="torch").step()
            assert (ref.detach() - full_w).abs().max() > 1e-3
            torch.testing.assert_close(w.full_tensor(), ref.detach(), rtol=0, atol=1e-6)
            assert opt.matrices_orthogonalized == (1 if rank == 0 else 0), placement
    finally:
        dist.destroy_process_group()


def test_fsdp2_on_one_rank_matches_one_process(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    _fsdp_worker(0, 1, str(tmp_path / "store"))


@pytest.mark.slow
def test_fsdp2_on_two_gloo_ranks_matches_one_process(tmp_path):
    """Each rank orthogonalizes its own matrices and the results come back as shards."""
    import torch.multiprocessing as mp

    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True)
