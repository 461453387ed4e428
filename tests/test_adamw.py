"""kernels.AdamW against torch.optim.AdamW: same updates, same state layout, same training run.

The Triton step runs in the interpreter here (``backend="triton"`` on CPU tensors); the PyTorch
path is the one CPU tensors take by default. Both must track ``torch.optim.AdamW`` started from
the same parameters.
"""

import copy

import pytest
import torch
import torch.nn as nn

from kernels import AdamW
from kernels import adamw as adamw_module

BACKENDS = ["triton", "torch"]


def _model(seed: int = 0) -> nn.Module:
    """Weights of 2800 elements span several interpreter chunks (1024) and blocks (256)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 70), nn.Tanh(), nn.Linear(70, 5))


def _batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(16, 40, generator=gen), torch.randn(16, 5, generator=gen)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = _batch(gen)
        optimizer.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        optimizer.step()


def _train_together(runs: list[tuple[nn.Module, torch.optim.Optimizer]], steps: int, seed: int = 1):
    """Step every (model, optimizer) with the gradients of the first model.

    Equal gradients compare the optimizers alone: gradients recomputed from parameters that differ
    in the last bit would let Adam magnify that rounding wherever a gradient nearly cancels.
    """
    gen = torch.Generator().manual_seed(seed)
    lead = runs[0][0]
    for _ in range(steps):
        x, y = _batch(gen)
        for _, optimizer in runs:
            optimizer.zero_grad()
        (lead(x) - y).pow(2).mean().backward()
        for model, _ in runs[1:]:
            for p, q in zip(model.parameters(), lead.parameters()):
                p.grad = q.grad.clone()
        for _, optimizer in runs:
            optimizer.step()


def _assert_same_params_and_states(model_a, opt_a, model_b, opt_b, rtol=1e-6):
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=1e-7)
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert float(sa["step"]) == float(sb["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            # Moments are sums of gradients that can cancel to near zero: relative to their scale.
            scale = sa[key].abs().max().item()
            torch.testing.assert_close(sa[key], sb[key], rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_ten_steps_match_torch_adamw(backend, weight_decay):
    ref_model, model = _model(), _model()
    kwargs = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), **kwargs)
    opt = AdamW(model.parameters(), **kwargs, backend=backend)
    _train_together([(ref_model, ref_opt), (model, opt)], 10)
    _assert_same_params_and_states(ref_model, ref_opt, model, opt)
    # The run moved the parameters well beyond the tolerance, so the comparison means something.
    assert (next(model.parameters()) - next(_model().parameters())).abs().max() > 0.1


def _groups(model: nn.Module) -> list[dict]:
    first, second = model[0], model[2]
    return [
        {"params": [first.weight, first.bias], "lr": 1e-2, "weight_decay": 0.2},
        {"params": [second.weight], "lr": 5e-2, "weight_decay": 0.0, "betas": (0.8, 0.99)},
        {"params": [second.bias], "lr": 2e-3},
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_groups_keep_their_own_hyperparameters(backend):
    ref_model, model = _model(), _model()
    ref_opt = torch.optim.AdamW(_groups(ref_model), lr=1e-3, weight_decay=0.05)
    opt = AdamW(_groups(model), lr=1e-3, weight_decay=0.05, backend=backend)
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 5e-2, 2e-3]
    _train_together([(ref_model, ref_opt), (model, opt)], 10)
    _assert_same_params_and_states(ref_model, ref_opt, model, opt)


def test_state_dict_has_the_torch_adamw_layout():
    ref_model, model = _model(), _model()
    ref_opt = torch.optim.AdamW(ref_model.parameters())
    opt = AdamW(model.parameters(), backend="torch")
    _train(ref_model, ref_opt, 2)
    _train(model, opt, 2)
    ours, theirs = opt.state_dict(), ref_opt.state_dict()
    assert ours["state"].keys() == theirs["state"].keys()
    for i, state in ours["state"].items():
        assert state.keys() == theirs["state"][i].keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert state["step"].shape == () and state["step"].dtype == torch.float32
        assert float(state["step"]) == 2.0
    assert [g["params"] for g in ours["param_groups"]] == [
        g["params"] for g in theirs["param_groups"]
    ]


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_moves_between_the_two_and_training_continues_identically(direction):
    first_cls, second_cls = (
        (torch.optim.AdamW, AdamW) if direction == "torch_to_ours" else (AdamW, torch.optim.AdamW)
    )

    def make(cls, model):
        extra = {"backend": "triton"} if cls is AdamW else {}
        return cls(_groups(model), lr=1e-3, weight_decay=0.05, **extra)

    model = _model()
    opt = make(first_cls, model)
    _train(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())

    # Uninterrupted: the first optimizer goes on. Resumed: the other one takes over its state.
    resumed_model = _model(seed=123)
    resumed_model.load_state_dict(saved_model)
    resumed_opt = make(second_cls, resumed_model)
    resumed_opt.load_state_dict(saved_opt)
    _train_together([(model, opt), (resumed_model, resumed_opt)], 4, seed=2)
    _assert_same_params_and_states(model, opt, resumed_model, resumed_opt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_parameters_keep_fp32_moments(backend):
    torch.manual_seed(0)
    params = [torch.randn(300, dtype=torch.bfloat16), torch.randn(7, 9, dtype=torch.bfloat16)]
    fp32_copies = [p.float() for p in params]
    opt = AdamW(params, lr=1e-2, weight_decay=0.1, backend=backend)
    ref = torch.optim.AdamW(fp32_copies, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        grads = [torch.randn(p.shape) for p in params]
        for p, q, g in zip(params, fp32_copies, grads):
            p.grad, q.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()
        opt.step()
        ref.step()
        # One bf16 rounding of the fp32 result per step (the interpreter truncates instead).
        for p, q in zip(params, fp32_copies):
            torch.testing.assert_close(p.float(), q, rtol=1e-2, atol=1e-2)
            q.copy_(p.float())
    for p in params:
        assert p.dtype == torch.bfloat16
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert opt.state[p]["exp_avg_sq"].dtype == torch.float32

    # Loading the state keeps the moments in fp32 (torch's loader would cast them to bf16).
    before = {i: s["exp_avg_sq"].clone() for i, s in opt.state_dict()["state"].items()}
    reloaded = AdamW(params, lr=1e-2, weight_decay=0.1, backend=backend)
    reloaded.load_state_dict(copy.deepcopy(opt.state_dict()))
    for i, s in reloaded.state_dict()["state"].items():
        assert s["exp_avg_sq"].dtype == torch.float32
        torch.testing.assert_close(s["exp_avg_sq"], before[i], rtol=0, atol=0)


def test_parameters_without_gradients_are_left_alone():
    a, b = torch.ones(5, requires_grad=True), torch.ones(5, requires_grad=True)
    opt = AdamW([a, b], lr=0.1, backend="triton")
    a.grad = torch.ones(5)
    opt.step()
    assert torch.all(b == 1) and b not in opt.state
    assert torch.all(a < 1) and float(opt.state[a]["step"]) == 1.0


def test_one_launch_covers_every_tensor(monkeypatch):
    launches = []
    real_launch = adamw_module._launch
    monkeypatch.setattr(
        adamw_module,
        "_launch",
        lambda ups, *rest: launches.append(len(ups)) or real_launch(ups, *rest),
    )
    model = _model()
    _train(model, AdamW(model.parameters(), backend="triton"), 1)
    assert launches == [len(list(model.parameters()))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_norm", [0.05, 1e3])  # clips every step / never clips
def test_clip_coefficient_folded_into_the_step_matches_clip_grad_norm_then_torch_adamw(
    backend, max_norm
):
    """clip_grad_scale + step(grad_scale=...) against clip_grad_norm_ + torch.optim.AdamW.

    The gradients are left as they were (the kernel scales them as it reads them), so the
    reference clips its own copy of the same gradients each step.
    """
    ref_model, model = _model(), _model()
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), **kwargs)
    opt = AdamW(model.parameters(), **kwargs, backend=backend)
    gen = torch.Generator().manual_seed(5)
    coefficients = []
    for _ in range(8):
        x, y = _batch(gen)
        opt.zero_grad()
        ref_opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        for p, q in zip(ref_model.parameters(), model.parameters()):
            p.grad = q.grad.clone()
        unclipped = [q.grad.clone() for q in model.parameters()]
        ref_norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), max_norm)
        norm, coefficient = adamw_module.clip_grad_scale(model.parameters(), max_norm)
        torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=0)
        coefficients.append(float(coefficient))
        opt.step(grad_scale=coefficient)
        ref_opt.step()
        for q, g in zip(model.parameters(), unclipped):
            assert torch.equal(q.grad, g)
    _assert_same_params_and_states(ref_model, ref_opt, model, opt)
    assert all(c < 0.5 for c in coefficients) if max_norm < 1 else all(c == 1 for c in coefficients)


def test_grad_scale_as_a_float_and_a_wrongly_shaped_one():
    torch.manual_seed(0)
    a = torch.randn(300)
    for backend in BACKENDS:
        pa, pb = a.clone().requires_grad_(), a.clone().requires_grad_()
        g = torch.randn(300)
        pa.grad, pb.grad = g.clone(), 0.25 * g
        AdamW([pa], lr=0.1, backend=backend).step(grad_scale=0.25)
        AdamW([pb], lr=0.1, backend=backend).step()
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
        with pytest.raises(ValueError, match="one value"):
            AdamW([pa], backend=backend).step(grad_scale=torch.ones(2))


def test_rejects_what_it_does_not_implement():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="backend"):
        AdamW([p], backend="cuda")
    with pytest.raises(ValueError, match="beta"):
        AdamW([p], betas=(0.9, 1.0))
    torch_opt = torch.optim.AdamW([p], amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad"):
        AdamW([p]).load_state_dict(torch_opt.state_dict())


def test_tiny_transformer_training_matches_torch_adamw():
    """A few steps of the project's model with clipping; same losses as with torch's AdamW."""
    from pretrain.config import ModelConfig
    from pretrain.model import Transformer

    cfg = ModelConfig(
        vocab_size=64, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=16
    )
    torch.manual_seed(0)
    start = Transformer(cfg).state_dict()

    def run(make_optimizer):
        torch.manual_seed(0)
        model = Transformer(cfg)
        model.load_state_dict(start)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        opt = make_optimizer(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
        )
        # One batch again and again: the loss must fall whatever the initial weights are.
        tokens = torch.randint(
            0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(3)
        )
        losses = []
        for _ in range(5):
            loss = model(tokens[:, :-1], tokens[:, 1:])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            losses.append(loss.item())
        return losses, model

    ref_losses, ref_model = run(lambda groups: torch.optim.AdamW(groups, lr=1e-2))
    losses, model = run(lambda groups: AdamW(groups, lr=1e-2, backend="triton"))
    assert ref_losses[-1] < ref_losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _fsdp_worker(rank: int, world_size: int, store_path: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size
    )
    try:
        ref_model = _model()
        model = copy.deepcopy(ref_model)
        fully_shard(model[0])
        fully_shard(model)
        assert isinstance(model[0].weight, DTensor)
        assert model[0].weight.to_local().shape[0] == 70 // world_size
        opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, backend="triton")
        ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.1)
        # Every rank sees the same batch, so FSDP's averaged gradient is the single-process one.
        for m, o in ((model, opt), (ref_model, ref_opt)):
            gen = torch.Generator().manual_seed(1)
            for _ in range(3):
                x, y = _batch(gen)
                o.zero_grad()
                (m(x) - y).pow(2).mean().backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
                o.step()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.full_tensor(), q, rtol=1e-5, atol=1e-6)
            for key in ("exp_avg", "exp_avg_sq"):
                assert isinstance(opt.state[p][key], DTensor)
                torch.testing.assert_close(
                    opt.state[p][key].full_tensor(), ref_opt.state[q][key], rtol=1e-4, atol=1e-9
                )
        state = get_optimizer_state_dict(model, opt)["state"]["0.weight"]
        assert state.keys() == {"step", "exp_avg", "exp_avg_sq"}
    finally:
        dist.destroy_process_group()


def test_fsdp2_parameters_with_clipping_match_torch_adamw_in_one_process(tmp_path):
    """FSDP2 on a world of one: DTensor parameters, gradients and states, in this process."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    _fsdp_worker(0, 1, str(tmp_path / "store"))


@pytest.mark.slow
def test_fsdp2_sharded_parameters_with_clipping_match_torch_adamw(tmp_path):
    """Two real gloo ranks: the step runs on each local shard; states stay sharded DTensors."""
    import torch.multiprocessing as mp

    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True)
