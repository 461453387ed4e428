"""Benchmark the training recipe: AdamW Llama against Muon and the speedrun's architecture options.

Three arms on the same data, the same model size (``configs/tiny.toml``), the same compute budget
per run and the same held-out bytes:

  a  the current recipe: configs/tiny.toml as it is (AdamW, cosine decay, 10 % warmup)
  b  Muon alone: optimizer.name = muon, everything else as in (a)
  c  Muon + qk_norm + zero_init_residual + untied embeddings, WSD schedule (short warmup,
     flat, linear cool-down to zero over the last part of the run)

**The budget is CPU time, not wall-clock time**: every run is a separate trainer process with
one thread (``torch.set_num_threads(1)``) and stops once its training steps have used
``--budget-s`` CPU seconds of that process (``time.process_time()``, evaluations excluded; the
trainer's ``train.cpu_budget_s``). On a shared machine wall-clock time measures the neighbours;
CPU time of one thread measures the work. Each arm's schedule is planned for the budget: a short
calibration run measures the arm's CPU seconds per step, and ``train.steps`` is the budget over
that (so warmup and cool-down fit in the budget).

Each arm is tuned by the same small sweep (3 learning rates, one run each at ``--sweep-budget-s``,
two evaluations),
then the best rate is run ``--repeats`` times at ``--budget-s`` with different seeds (model init
and data order), interleaved a, b, c, a, b, c, at most ``--jobs`` processes at a time. Every
run evaluates the val bits per byte on the same held-out batches (the val loader's seed is fixed,
whatever the run's seed) about ``--evals`` times; the curves come from the trainer's metrics.jsonl.

Reported: the sweep, the final val bpb per repeat, mean and spread (max - min), the CPU time for
each arm to reach (a)'s mean final val bpb (linear between evaluations) and its ratio to (a)'s
time, and one PNG of val bpb against CPU seconds and against tokens.

    python scripts/bench_recipe.py                                 # the full benchmark
    python scripts/bench_recipe.py --budget-s 10 --sweep-budget-s 5 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.config import Config, ModelConfig, load_config  # noqa: E402
from pretrain.errors import UserError  # noqa: E402
from pretrain.plot import read_metrics  # noqa: E402

ARMS = ("a", "b", "c")
ARM_NAMES = {
    "a": "AdamW Llama (configs/tiny.toml)",
    "b": "Muon",
    "c": "Muon + qk_norm + zero-init + untied, WSD",
}
# The sweeps: (a) sweeps train.lr; (b) and (c) sweep optimizer.muon_lr, with the AdamW part
# (embeddings, head, norms) at muon_lr / MUON_TO_ADAMW, so one knob moves both rates.
SWEEPS = {
    "a": (2e-3, 4e-3, 8e-3),
    "b": (0.02, 0.04, 0.08),
    "c": (0.02, 0.04, 0.08),
}
MUON_TO_ADAMW = 10.0
VAL_SEED = 0  # the val loader's seed in every run: the same held-out bytes for all
SWEEP_SEED = 1337
CALIBRATION_STEPS = 4  # the first step (allocation, warm caches) is left out of the rate
WSD_DECAY_FRACTION = 0.4
ARCH_OPTIONS = ("qk_norm", "zero_init_residual")


# --------------------------------------------------------------------------- what one run is


@dataclass
class RunSpec:
    """One trainer process: its arm, rate, seed, budget and the steps its schedule spans."""

    arm: str
    lr: float
    seed: int
    budget_s: float
    steps: int
    out_dir: str
    evals: int = 8
    eval_batches: int = 4
    log_every: int = 0  # 0: at every evaluation
    batch_size: int = 8  # sequences per step (one micro-batch)

    def overrides(self) -> list[tuple[str, str]]:
        """The config overrides on top of the base config that make this run its arm."""
        warmup = max(1, round(0.1 * self.steps))  # tiny.toml: 30 of 300 steps
        common = [
            ("train.steps", str(self.steps)),
            ("train.seed", str(self.seed)),
            ("train.cpu_budget_s", str(self.budget_s)),
            ("train.device", "cpu"),
            ("train.global_batch_size", str(self.batch_size)),
            ("train.micro_batch_size", str(self.batch_size)),
            ("train.dtype", "fp32"),
            ("eval.every", str(max(1, self.steps // self.evals))),
            ("eval.batches", str(self.eval_batches)),
            ("logging.every", str(self.log_every or max(1, self.steps // self.evals))),
            ("checkpoint.every", "0"),
            ("checkpoint.keep_last", "1"),
        ]
        if self.arm == "a":
            return [*common, ("train.lr", repr(self.lr)), ("train.warmup_steps", str(warmup))]
        muon = [
            ("optimizer.name", "muon"),
            ("optimizer.muon_lr", repr(self.lr)),
            ("train.lr", repr(self.lr / MUON_TO_ADAMW)),
        ]
        if self.arm == "b":
            return [*common, *muon, ("train.warmup_steps", str(warmup))]
        return [
            *common,
            *muon,
            ("model.qk_norm", "true"),
            ("model.zero_init_residual", "true"),
            ("model.tie_embeddings", "false"),
            ("train.schedule", "wsd"),
            ("train.decay_fraction", str(WSD_DECAY_FRACTION)),
            ("train.min_lr_ratio", "0.0"),
            ("train.warmup_steps", str(max(1, round(0.02 * self.steps)))),
        ]


@dataclass
class RunResult:
    spec: RunSpec
    ok: bool
    evals: list[dict] = field(default_factory=list)  # {"step", "tokens", "cpu_s", "val_bpb"}
    steps_done: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0
    error: str = ""

    @property
    def final_bpb(self) -> float:
        return self.evals[-1]["val_bpb"] if self.ok and self.evals else math.inf


def arch_options_available() -> bool:
    """Arm (c) needs the model options; a checkout without them cannot run it."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return all(name in names for name in ARCH_OPTIONS)


# --------------------------------------------------------------------------- the worker


def worker(spec_path: Path, base_config: Path, data_path: Path) -> int:
    """Train one run in this process, one thread, with the val batches of :data:`VAL_SEED`."""
    import torch

    torch.set_num_threads(1)
    from pretrain.train import train

    spec = RunSpec(**json.loads(spec_path.read_text()))
    config = load_config(
        base_config, [("data.path", str(data_path)), *spec.overrides()], config_cls=Config
    )
    started = time.perf_counter()
    try:
        train(config, spec.out_dir, data=_fixed_val_data(config))
    except UserError as e:  # a divergence at a high rate is a result of the sweep
        print(f"run failed: {e}", file=sys.stderr)
        return 2
    print(f"wall {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def _fixed_val_data(config: Config):
    """The trainer's own data of ``config``, but with the val split read as for
    :data:`VAL_SEED`: the val batches are then the same in every run, whatever its seed."""
    from pretrain.train import TrainData, _default_data

    data = _default_data(config)
    val_config = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=VAL_SEED))
    return TrainData(
        make_train=data.make_train,
        make_val=_default_data(val_config).make_val,
        bytes_per_token=data.bytes_per_token,
        tokenizer_path=data.tokenizer_path,
    )


# --------------------------------------------------------------------------- running runs


class Runner:
    """Starts worker processes, at most ``jobs`` at a time, and reads their results."""

    def __init__(self, base_config: Path, data_path: Path, jobs: int, quiet: bool = False):
        self.base_config, self.data_path, self.jobs, self.quiet = (
            base_config,
            data_path,
            jobs,
            quiet,
        )

    def run_all(self, specs: list[RunSpec]) -> list[RunResult]:
        """Run ``specs`` in order (``jobs`` at a time); a finished run with the same spec is
        read back instead of run again, so an interrupted benchmark continues."""
        results: dict[int, RunResult] = {}
        pending = list(enumerate(specs))
        running: list[tuple[int, RunSpec, subprocess.Popen, float]] = []
        while pending or running:
            while pending and len(running) < self.jobs:
                i, spec = pending.pop(0)
                done = self._finished(spec)
                if done is not None:
                    results[i] = done
                    continue
                running.append((i, spec, self._start(spec), time.perf_counter()))
            for item in list(running):
                i, spec, proc, started = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                results[i] = self._collect(spec, proc, time.perf_counter() - started)
                self._report(results[i])
            time.sleep(0.2)
        return [results[i] for i in range(len(specs))]

    def _start(self, spec: RunSpec) -> subprocess.Popen:
        out = Path(spec.out_dir)
        if out.exists():
            _remove_tree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        spec_file = out.parent / f"{out.name}.spec.json"
        spec_file.write_text(json.dumps(dataclasses.asdict(spec)))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        env.setdefault("WANDB_MODE", "disabled")
        log = open(out.parent / f"{out.name}.log", "w")  # noqa: SIM115 (closed with the process)
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            str(spec_file),
            "--config",
            str(self.base_config),
            "--data",
            str(self.data_path),
        ]
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def _finished(self, spec: RunSpec) -> RunResult | None:
        out = Path(spec.out_dir)
        spec_file = out.parent / f"{out.name}.spec.json"
        status = out / "status.json"
        if not (spec_file.is_file() and status.is_file()):
            return None
        if json.loads(spec_file.read_text()) != dataclasses.asdict(spec):
            return None
        if json.loads(status.read_text()).get("state") != "finished":
            return None
        result = read_result(spec, wall_s=0.0)
        self._report(result, reused=True)
        return result

    def _collect(self, spec: RunSpec, proc: subprocess.Popen, wall_s: float) -> RunResult:
        if proc.returncode != 0:
            log = Path(spec.out_dir).parent / f"{Path(spec.out_dir).name}.log"
            lines = log.read_text().strip().splitlines() if log.is_file() else []
            return RunResult(spec, ok=False, wall_s=wall_s, error=(lines or ["?"])[-1][:200])
        return read_result(spec, wall_s)

    def _report(self, r: RunResult, reused: bool = False) -> None:
        if self.quiet:
            return
        s = r.spec
        how = "reused" if reused else f"wall {r.wall_s:.0f} s"
        if r.ok:
            print(
                f"  [{s.arm}] lr {s.lr:g} seed {s.seed}: val bpb {r.final_bpb:.4f} after "
                f"{r.steps_done}/{s.steps} steps, {r.cpu_s:.1f} CPU s ({how})",
                flush=True,
            )
        else:
            print(f"  [{s.arm}] lr {s.lr:g} seed {s.seed}: FAILED: {r.error}", flush=True)


def read_result(spec: RunSpec, wall_s: float) -> RunResult:
    """The evaluations and the CPU seconds of a finished run, from its metrics.jsonl."""
    records = read_metrics(spec.out_dir)
    evals = [
        {k: r[k] for k in ("step", "tokens", "cpu_s", "val_bpb")}
        for r in records
        if r.get("kind") == "eval" and r.get("val_bpb") is not None
    ]
    train = [r for r in records if r.get("kind") == "train"]
    last = train[-1] if train else {"step": 0, "cpu_s": 0.0}
    return RunResult(
        spec,
        ok=bool(evals),
        evals=evals,
        steps_done=last["step"],
        cpu_s=last["cpu_s"],
        wall_s=wall_s,
    )


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


# --------------------------------------------------------------------------- calibration


def calibrate(
    runner: Runner, arms: list[str], out: Path, args: argparse.Namespace
) -> dict[str, float]:
    """CPU seconds per training step of each arm, from a short run of the trainer."""
    specs = [
        RunSpec(
            arm=arm,
            lr=SWEEPS[arm][1],
            seed=SWEEP_SEED,
            budget_s=0.0,
            steps=CALIBRATION_STEPS,
            out_dir=str(out / "calibrate" / arm),
            evals=1,
            eval_batches=1,
            log_every=1,
            batch_size=args.batch_size,
        )
        for arm in arms
    ]
    rates = {}
    for spec, result in zip(specs, runner.run_all(specs)):
        if not result.ok:
            raise UserError(f"the calibration run of arm {spec.arm} failed: {result.error}")
        train = [r for r in read_metrics(spec.out_dir) if r.get("kind") == "train"]
        first, last = train[0], train[-1]
        rates[spec.arm] = (last["cpu_s"] - first["cpu_s"]) / max(1, last["step"] - first["step"])
    return rates


def planned_steps(budget_s: float, seconds_per_step: float) -> int:
    """The steps a schedule spans so that they fit in ``budget_s`` CPU seconds, with 5 % to
    spare: a run a little slower than its calibration still finishes its cool-down."""
    return max(4, int(0.95 * budget_s / seconds_per_step))


# --------------------------------------------------------------------------- the analysis


def time_to_reach(evals: list[dict], target: float) -> float | None:
    """CPU seconds at which the val bpb curve first reaches ``target`` (linear between
    evaluations; None: never)."""
    prev = None
    for e in evals:
        if e["val_bpb"] <= target:
            if prev is None or prev["val_bpb"] == e["val_bpb"]:
                return e["cpu_s"]
            frac = (prev["val_bpb"] - target) / (prev["val_bpb"] - e["val_bpb"])
            return prev["cpu_s"] + frac * (e["cpu_s"] - prev["cpu_s"])
        prev = e
    return None


def summarize(finals: dict[str, list[RunResult]], best_lr: dict[str, float]) -> list[dict]:
    """One row per arm: best rate, final bpb per repeat, mean, spread, time to (a)'s final."""
    target = statistics.mean(r.final_bpb for r in finals["a"]) if "a" in finals else None
    a_time = statistics.mean(r.evals[-1]["cpu_s"] for r in finals["a"]) if target else None
    rows = []
    for arm, results in finals.items():
        bpbs = [r.final_bpb for r in results]
        if arm == "a":  # its own target: where its runs ended, by definition
            times = [r.evals[-1]["cpu_s"] for r in results]
        else:
            times = [time_to_reach(r.evals, target) for r in results] if target else []
        reached = all(t is not None for t in times) and times
        t_mean = statistics.mean(times) if reached else None
        rows.append(
            {
                "arm": arm,
                "name": ARM_NAMES[arm],
                "best_lr": best_lr[arm],
                "final_bpb": bpbs,
                "mean": statistics.mean(bpbs),
                "spread": max(bpbs) - min(bpbs),
                "steps": [r.steps_done for r in results],
                "cpu_s": [r.cpu_s for r in results],
                "time_to_a": t_mean,
                "ratio": t_mean / a_time if t_mean is not None and a_time else None,
            }
        )
    return rows


def verdict(rows: list[dict]) -> str:
    """The issue's criteria for (c) against (a): time ratio <= 0.7 and a gap beyond the spread."""
    by = {r["arm"]: r for r in rows}
    if "a" not in by or "c" not in by:
        return "no verdict: arms a and c are both needed"
    a, c = by["a"], by["c"]
    spread = max(a["spread"], c["spread"])
    fast = c["ratio"] is not None and c["ratio"] <= 0.7
    better = a["mean"] - c["mean"] > spread
    ratio = "never" if c["ratio"] is None else f"{c['ratio']:.2f}"
    return (
        f"(c) reaches (a)'s final val bpb at {ratio} x (a)'s CPU time (target <= 0.70): "
        f"{'met' if fast else 'NOT met'}; (c) is {a['mean'] - c['mean']:.4f} bpb below (a), "
        f"the larger repeat spread is {spread:.4f}: {'met' if better else 'NOT met'}. "
        f"Recipe (c) {'WINS' if fast and better else 'does not win'} by the criteria."
    )


def table(rows: list[dict], sweep: dict[str, list[RunResult]]) -> str:
    """The results as Markdown: the sweep, then the final runs."""
    lines = ["| arm | learning rates swept: final val bpb | best |", "|---|---|---|"]
    for arm, results in sweep.items():
        cells = ", ".join(
            f"{r.spec.lr:g}: {r.final_bpb:.4f}" if r.ok else f"{r.spec.lr:g}: diverged"
            for r in results
        )
        best = min(results, key=lambda r: r.final_bpb).spec.lr
        lines.append(f"| {arm} | {cells} | {best:g} |")
    lines += [
        "",
        "| arm | recipe | best LR | final val bpb per repeat | mean | spread | steps | "
        "CPU s to (a)'s final bpb | ratio to (a) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = "never" if r["time_to_a"] is None else f"{r['time_to_a']:.1f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(
            f"| {r['arm']} | {r['name']} | {r['best_lr']:g} | "
            f"{', '.join(f'{b:.4f}' for b in r['final_bpb'])} | {r['mean']:.4f} | "
            f"{r['spread']:.4f} | {', '.join(map(str, r['steps']))} | {t} | {ratio} |"
        )
    return "\n".join(lines)


def plot(finals: dict[str, list[RunResult]], target: float | None, path: Path, title: str) -> None:
    """val bpb against CPU seconds and against tokens, every repeat of every arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"a": "tab:blue", "b": "tab:orange", "c": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=80)
    for arm, results in finals.items():
        for i, r in enumerate(results):
            label = f"({arm}) {ARM_NAMES[arm]}" if i == 0 else None
            for ax, x in zip(axes, ("cpu_s", "tokens")):
                ax.plot(
                    [e[x] for e in r.evals[1:]],
                    [e["val_bpb"] for e in r.evals[1:]],
                    color=colors[arm],
                    alpha=0.85,
                    lw=1.2,
                    marker=".",
                    label=label,
                )
    for ax, xlabel in zip(axes, ("CPU seconds of the training process (1 thread)", "tokens")):
        if target is not None:
            ax.axhline(target, color="gray", ls=":", lw=1, label="(a)'s final (mean)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val bits per byte")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as tmp:
        fig.savefig(tmp.name)
    os.replace(tmp.name, path)
    plt.close(fig)


# --------------------------------------------------------------------------- the benchmark


def interleave(per_arm: dict[str, list[RunSpec]]) -> list[RunSpec]:
    """a1, b1, c1, a2, b2, c2, ...: neighbours on the machine fall on every arm alike."""
    out = []
    for i in range(max(len(v) for v in per_arm.values())):
        out += [specs[i] for specs in per_arm.values() if i < len(specs)]
    return out


def benchmark(args: argparse.Namespace) -> dict:
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise UserError(f"--arms: unknown arm {unknown[0]!r}; choose from a, b, c")
    if "c" in arms and not arch_options_available():
        raise UserError(
            "arm c needs model.qk_norm and model.zero_init_residual, which this checkout's "
            "ModelConfig lacks; run --arms a,b"
        )
    if not (Path(args.data) / "manifest.json").is_file():
        raise UserError(
            f"{args.data} holds no prepared dataset; run `pretrain prepare --out {args.data}` "
            "(the default corpus) first"
        )
    out = Path(args.out)
    runner = Runner(Path(args.config), Path(args.data), args.jobs, quiet=args.quiet)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))

    say(f"calibrating CPU seconds per step ({CALIBRATION_STEPS} steps per arm, 1 thread)")
    rates = calibrate(runner, arms, out, args)
    for arm in arms:
        say(f"  [{arm}] {rates[arm]:.3f} CPU s/step")

    def specs_for(arm: str, lrs, budget: float, seeds, kind: str, evals: int) -> list[RunSpec]:
        steps = planned_steps(budget, rates[arm])
        return [
            RunSpec(
                arm,
                lr,
                seed,
                budget,
                steps,
                str(out / kind / f"{arm}-lr{lr:g}-s{seed}"),
                evals=evals,
                eval_batches=args.eval_batches,
                batch_size=args.batch_size,
            )
            for lr in lrs
            for seed in seeds
        ]

    say(f"sweep: {args.sweep_budget_s:g} CPU s per run")
    lrs = {arm: _sweep_rates(arm, args) for arm in arms}
    sweep_specs = {
        a: specs_for(a, lrs[a], args.sweep_budget_s, [SWEEP_SEED], "sweep", 2) for a in arms
    }
    sweep_results = runner.run_all(interleave(sweep_specs))
    sweep = {a: [r for r in sweep_results if r.spec.arm == a] for a in arms}
    best_lr = {a: min(sweep[a], key=lambda r: r.final_bpb).spec.lr for a in arms}
    if any(not any(r.ok for r in sweep[a]) for a in arms):
        raise UserError("every sweep run of an arm failed; see the logs under " + str(out))

    say(f"final runs: {args.budget_s:g} CPU s per run, {args.repeats} repeats, interleaved")
    seeds = [args.seed + i for i in range(args.repeats)]
    final_specs = {
        a: [
            s
            for seed in seeds
            for s in specs_for(a, [best_lr[a]], args.budget_s, [seed], "final", args.evals)
        ]
        for a in arms
    }
    final_results = runner.run_all(interleave(final_specs))
    finals = {a: [r for r in final_results if r.spec.arm == a] for a in arms}
    failed = [r for r in final_results if not r.ok]
    if failed:
        raise UserError(f"a final run failed ({failed[0].spec.out_dir}): {failed[0].error}")

    rows = summarize(finals, best_lr)
    report = {
        "budget": "CPU seconds of the training process, one thread (time.process_time), "
        "evaluations excluded",
        "budget_s": args.budget_s,
        "sweep_budget_s": args.sweep_budget_s,
        "cpu_s_per_step": rates,
        "sweep": {a: [[r.spec.lr, r.final_bpb if r.ok else None] for r in sweep[a]] for a in arms},
        "rows": rows,
        "verdict": verdict(rows),
        "curves": {a: [r.evals for r in finals[a]] for a in arms},
        "command": " ".join(sys.argv),
    }
    target = next((r["mean"] for r in rows if r["arm"] == "a"), None)
    if args.png:
        title = (
            f"tiny model, {args.budget_s:g} CPU s per run (1 thread), "
            f"{args.repeats} repeats per arm"
        )
        plot(finals, target, Path(args.png), title)
    print()
    print(
        f"budget: {args.budget_s:g} CPU seconds per final run ({args.sweep_budget_s:g} per "
        "sweep run) of the training process with one thread (time.process_time, "
        "evaluations excluded); not wall-clock time"
    )
    print(table(rows, sweep))
    print()
    print(report["verdict"])
    if args.json:
        _write_json(Path(args.json), report)
    return report


def _sweep_rates(arm: str, args: argparse.Namespace) -> tuple[float, ...]:
    given = getattr(args, f"lrs_{arm}")
    if not given:
        return SWEEPS[arm]
    try:
        rates = tuple(float(x) for x in given.split(","))
    except ValueError:
        raise UserError(f"--lrs-{arm} {given!r}: give comma-separated numbers") from None
    if not 1 <= len(rates) <= 4 or min(rates) <= 0:
        raise UserError(f"--lrs-{arm} {given!r}: give 1 to 4 positive learning rates")
    return rates


def _write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/tiny.toml"), help="base config")
    p.add_argument("--data", default=str(ROOT / "data/stdlib"), help="a prepared dataset")
    p.add_argument("--out", default=str(ROOT / "runs/bench_recipe"), help="run directories")
    p.add_argument("--arms", default="a,b,c", help="comma-separated subset of a,b,c")
    p.add_argument("--budget-s", type=float, default=20.0, help="CPU s per final run")
    p.add_argument("--sweep-budget-s", type=float, default=20.0, help="CPU s per sweep run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step, every arm")
    p.add_argument("--seed", type=int, default=1000, help="seed of the first repeat")
    p.add_argument("--jobs", type=int, default=2, help="trainer processes at a time")
    p.add_argument("--evals", type=int, default=5, help="evaluations per run")
    p.add_argument("--eval-batches", type=int, default=4, help="val batches per evaluation")
    for arm in ARMS:
        p.add_argument(
            f"--lrs-{arm}",
            default="",
            help=f"the sweep of arm {arm} (default {','.join(map(str, SWEEPS[arm]))})",
        )
    p.add_argument("--png", default="", help="write the curves here")
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.jobs < 1 or args.evals < 1:
        p.error("--repeats, --jobs and --evals must be at least 1")
    if args.budget_s <= 0 or args.sweep_budget_s <= 0:
        p.error("--budget-s and --sweep-budget-s must be positive CPU seconds")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.worker:
            return worker(Path(args.worker), Path(args.config), Path(args.data))
        benchmark(args)
    except UserError as e:
        print(f"bench_recipe: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
