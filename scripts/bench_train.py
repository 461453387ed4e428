"""Benchmark the trainer's step against a plain eager PyTorch training step, side by side.

CPU section (always): the same architecture and the same batch, trained by
  - ours:     pretrain.model.Transformer + pretrain.train.train_step (token-normalised loss,
              gradient accumulation, clipping, AdamW with decay groups)
  - baseline: a self-contained Llama written below in plain PyTorch with the textbook loop
              (mean loss / accum, backward, clip_grad_norm_, AdamW.step)
Both start from the same weights (the baseline loads ours) and their first losses are checked
to agree, so the comparison is of the same computation. Steps alternate between the two, and
the table reports the median seconds per step and the ratio ours / baseline (<= 1: not slower).

GPU section (when CUDA is available): tokens/s and MFU of gpt2-124m and llama-1b on one GPU
for a few steps of random tokens, with the PyTorch reference ops, with the Triton kernels, and
with the Triton kernels plus torch.compile.

Activation checkpointing section (``--only ac``): llama-1b (configs/llama-1b.toml) on one GPU
with the Triton kernels, trained with ``train.activation_checkpointing`` none, selective and
full at the same micro batch: tokens/s, MFU (the model's flops_per_token over the device's
dense bf16 peak, pretrain.metrics.peak_flops) and peak memory for each, after warm-up steps.
``--device cpu --tiny`` runs the same section on the tiny config on a CPU with the PyTorch
reference ops (no MFU: the peak of a CPU is not known), which checks the code path without a GPU.

    python scripts/bench_train.py                    # CPU: tiny config, 10 timed steps each
    python scripts/bench_train.py --json out.json    # also write the numbers as JSON
    python scripts/bench_train.py --only ac --json ac.json          # the AC section, on a GPU
    python scripts/bench_train.py --only ac --device cpu --tiny     # its code path on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.config import load_config  # noqa: E402
from pretrain.model import Transformer  # noqa: E402
from pretrain.train import build_optimizer, param_groups, train_step  # noqa: E402

# --------------------------------------------------------------------------- the eager baseline


class EagerRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(
            x
        ) * self.weight


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class EagerAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.h, self.kv, self.d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, self.h * self.d, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.kv * self.d, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.kv * self.d, bias=False)
        self.o_proj = nn.Linear(self.h * self.d, cfg.d_model, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.d).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv, self.d).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(self.h // self.kv, dim=1)
        v = v.repeat_interleave(self.h // self.kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class EagerMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class EagerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = EagerRMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = EagerAttention(cfg)
        self.post_attention_layernorm = EagerRMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = EagerMLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class EagerLlama(nn.Module):
    """The same Llama architecture as pretrain.model, written plainly for comparison."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(EagerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = EagerRMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, idx, targets):
        T = idx.shape[1]
        inv = 1.0 / (
            self.cfg.rope_theta
            ** (torch.arange(0, self.cfg.head_dim, 2).float() / self.cfg.head_dim)
        )
        freqs = torch.outer(torch.arange(T, device=idx.device).float(), inv.to(idx.device))
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x)).float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def eager_step(model, optimizer, inputs, targets, micro: int, grad_clip: float, lr: float) -> float:
    """The textbook step: mean loss per micro-batch / accumulation steps, clip, AdamW."""
    accum = inputs.shape[0] // micro
    total = 0.0
    for start in range(0, inputs.shape[0], micro):
        loss = model(inputs[start : start + micro], targets[start : start + micro]) / accum
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


# --------------------------------------------------------------------------- CPU section


@dataclass
class Batch:
    inputs: torch.Tensor
    targets: torch.Tensor
    doc_ids: torch.Tensor | None = None


def cpu_section(args) -> dict:
    cfg = load_config(args.config, [("train.device", "cpu")])
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, args.seq_len)
    torch.manual_seed(0)
    ours = Transformer(cfg.model)
    base = EagerLlama(cfg.model)
    base.load_state_dict(ours.state_dict())
    opt_ours = build_optimizer(ours, cfg, torch.device("cpu"))
    kw = dict(
        lr=cfg.train.lr, betas=(cfg.optimizer.beta1, cfg.optimizer.beta2), eps=cfg.optimizer.eps
    )
    opt_base = torch.optim.AdamW(param_groups(base, cfg.optimizer.weight_decay), **kw)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq_len + 1), generator=g)
    batch = Batch(tokens[:, :-1], tokens[:, 1:])

    def run_ours() -> float:
        stats = train_step(ours, opt_ours, batch, step=1, lr=cfg.train.lr, micro_batch_size=args.micro,
                           world_size=1, grad_clip=cfg.train.grad_clip, device=torch.device("cpu"))  # fmt: skip
        return stats.loss

    def run_base() -> float:
        return eager_step(base, opt_base, batch.inputs, batch.targets, args.micro,
                          cfg.train.grad_clip, cfg.train.lr)  # fmt: skip

    first_ours, first_base = run_ours(), run_base()
    if not math.isclose(first_ours, first_base, rel_tol=1e-4):
        raise SystemExit(f"the two steps disagree: loss {first_ours} vs {first_base}")
    for _ in range(args.warmup - 1):
        run_ours(), run_base()
    times = {"ours": [], "baseline": []}
    for _ in range(args.steps):
        for name, fn in (("ours", run_ours), ("baseline", run_base)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "config": args.config, "batch": args.batch, "micro_batch": args.micro,
        "seq_len": args.seq_len, "threads": torch.get_num_threads(), "steps": args.steps,
        "first_loss": first_ours, "median_s": med, "ratio_ours_over_baseline": med["ours"] / med["baseline"],
    }  # fmt: skip


# --------------------------------------------------------------------------- GPU section


def gpu_run(
    config_path: str,
    mode: str,
    steps: int,
    micro: int,
    seq_len: int,
    *,
    ac: str | None = None,
    device_type: str = "cuda",
    warmup: int = 3,
) -> dict:
    """tokens/s and MFU of ``steps`` training steps on random tokens on one device.

    ``ac``: the activation checkpointing mode (None: the config's). On a GPU the model is
    built on the device itself (no minute-long CPU initialisation of a 1B model) and trained in
    bf16 through FSDP2's one-process mixed precision, as the trainer does.
    """
    import kernels
    from pretrain.metrics import mfu, peak_flops, peak_memory_gb
    from pretrain.parallel import init_distributed, parallelize

    cfg = load_config(config_path, [("train.device", device_type)])
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, seq_len)
    dist_info = init_distributed(device_type)  # on a GPU a one-process group: FSDP2 carries bf16
    device = dist_info.device
    cuda = device.type == "cuda"
    kernels.set_backend("torch" if mode == "reference" else "triton")
    torch.manual_seed(0)
    with device:
        model = Transformer(cfg.model)
    flops = model.flops_per_token(seq_len)
    model = parallelize(model, dist_info, param_dtype=torch.bfloat16 if cuda else torch.float32,
                        activation_checkpointing=cfg.train.activation_checkpointing if ac is None else ac,
                        compile=mode == "triton+compile")  # fmt: skip
    cfg.optimizer.name = "torch" if mode == "reference" else "adamw"
    optimizer = build_optimizer(model, cfg, device)
    tokens = torch.randint(0, cfg.model.vocab_size, (micro, seq_len + 1), device=device)
    batch = Batch(tokens[:, :-1], tokens[:, 1:])
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        return train_step(model, optimizer, batch, step=1, lr=1e-4, micro_batch_size=micro,
                          world_size=1, grad_clip=1.0, device=device)  # fmt: skip

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    for _ in range(warmup):  # warm-up (and compilation)
        loss = step().loss
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step().loss
    sync()
    tps = steps * micro * seq_len / (time.perf_counter() - t0)
    if not math.isfinite(loss):
        raise RuntimeError(f"the loss is {loss} after {warmup + steps} steps")
    result = {
        "config": Path(config_path).stem, "mode": mode, "tokens_per_s": tps,
        "mfu": mfu(flops, tps, 1, peak_flops(device)),
        "peak_mem_gb": peak_memory_gb(device),
        "micro_batch": micro, "seq_len": seq_len, "steps": steps, "loss": loss,
        "flops_per_token": flops,
    }  # fmt: skip
    if ac is not None:
        result["activation_checkpointing"] = ac
    kernels.set_backend("auto")
    return result


def gpu_section(args) -> list[dict]:
    rows = []
    for config_path, micro, seq_len in (("configs/gpt2-124m.toml", 16, 1024),
                                        ("configs/llama-1b.toml", 4, 2048)):  # fmt: skip
        for mode in ("reference", "triton", "triton+compile"):
            try:
                rows.append(gpu_run(config_path, mode, args.gpu_steps, micro, seq_len))
            except Exception as e:  # one failing mode should not hide the others
                rows.append(
                    {"config": Path(config_path).stem, "mode": mode, "error": repr(e)[:200]}
                )
            torch.cuda.empty_cache()  # the finished run's model and optimizer are gone
            print(json.dumps(rows[-1]), flush=True)
    return rows


AC_MODES = ("none", "selective", "full")


def ac_section(args) -> list[dict]:
    """One run per activation checkpointing mode, same model, batch and steps."""
    if args.tiny:
        config, micro, seq_len, steps, warmup = "configs/tiny.toml", 2, 64, 2, 1
    else:
        config, micro, seq_len, steps, warmup = (args.ac_config, args.ac_micro, args.ac_seq_len,
                                                 args.gpu_steps, 3)  # fmt: skip
    mode = "triton" if args.device == "cuda" else "reference"  # no interpreter on a CPU here
    rows = []
    for ac in AC_MODES:
        try:
            rows.append(gpu_run(config, mode, steps, micro, seq_len, ac=ac,
                                device_type=args.device, warmup=warmup))  # fmt: skip
        except Exception as e:  # an out-of-memory mode should not hide the others
            rows.append({"config": Path(config).stem, "activation_checkpointing": ac,
                         "error": repr(e)[:300]})  # fmt: skip
        if args.device == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    return rows


def print_ac_table(rows: list[dict], device_name: str) -> None:
    r0 = next((r for r in rows if "error" not in r), rows[0])
    print(f"\nActivation checkpointing ({r0['config']}, {device_name}, micro batch "
          f"{r0.get('micro_batch')} x {r0.get('seq_len')}, {r0.get('steps')} timed steps)")  # fmt: skip
    print("| activation checkpointing | tokens/s | MFU | peak mem GB | last loss |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['activation_checkpointing']} | failed: {r['error']} | | | |")
            continue
        m = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "-"
        print(f"| {r['activation_checkpointing']} | {r['tokens_per_s']:,.0f} | {m} | {mem} "
              f"| {r['loss']:.4f} |")  # fmt: skip


def write_json(path: str, out: dict) -> None:
    """Atomically: a reader (gpu_check.sh's summary) never sees half a file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(target)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="configs/tiny.toml")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (CPU)")
    p.add_argument("--micro", type=int, default=4, help="sequences per micro-batch (CPU)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per implementation (CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gpu-steps", type=int, default=10, help="timed steps per GPU run")
    p.add_argument("--no-gpu", action="store_true")
    p.add_argument("--only", choices=("all", "ac"), default="all",
                   help="ac: only the activation checkpointing section")  # fmt: skip
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="the device of the ac section")  # fmt: skip
    p.add_argument("--tiny", action="store_true",
                   help="ac section on configs/tiny.toml, 2 steps (a CPU check of the path)")  # fmt: skip
    p.add_argument("--ac-config", default="configs/llama-1b.toml")
    p.add_argument("--ac-micro", type=int, default=8, help="sequences per step (ac section)")
    p.add_argument("--ac-seq-len", type=int, default=2048)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    if args.only == "ac":
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("bench_train: no CUDA device; use --device cpu --tiny on a CPU")
        rows = ac_section(args)
        name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
        print_ac_table(rows, name)
        if args.json:
            write_json(args.json, {"device": name, "activation_checkpointing": rows})
        if any("error" in r for r in rows):
            raise SystemExit(1)
        return
    out = {"cpu": cpu_section(args)}
    c = out["cpu"]
    print(f"\nCPU step ({c['config']}, batch {c['batch']} x {c['seq_len']}, micro {c['micro_batch']}, "
          f"{c['threads']} threads, median of {c['steps']})")  # fmt: skip
    print("| implementation | s/step | ratio |\n|---|---|---|")
    print(f"| plain eager PyTorch | {c['median_s']['baseline']:.3f} | 1.00 |")
    print(
        f"| pretrain train_step | {c['median_s']['ours']:.3f} | {c['ratio_ours_over_baseline']:.2f} |"
    )
    if torch.cuda.is_available() and not args.no_gpu:
        out["gpu"] = gpu_section(args)
        print(f"\nGPU ({torch.cuda.get_device_name(0)}, {args.gpu_steps} steps, bf16)")
        print("| config | ops | tokens/s | MFU | peak mem GB |\n|---|---|---|---|---|")
        for r in out["gpu"]:
            if "error" in r:
                print(f"| {r['config']} | {r['mode']} | failed: {r['error']} | | |")
                continue
            m = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            print(
                f"| {r['config']} | {r['mode']} | {r['tokens_per_s']:,.0f} | {m} | {r['peak_mem_gb']:.1f} |"
            )
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
