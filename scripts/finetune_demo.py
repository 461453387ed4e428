"""Fine-tuning teaches a pretrained model a rule it could not know: a toy task, end to end on CPU.

The task: a prompt is a handful of filler words with one colour word among them; the answer is
the colour's one-word action (red -> stop, green -> go, yellow -> wait, blue -> swim). The
pipeline, every stage through the ``pretrain`` command line:

1. pretrain the tiny model briefly on the prepared corpus (or start from ``--base``);
2. export it, and ask it the held-out prompts with greedy ``pretrain generate``;
3. ``pretrain finetune`` it on a few thousand generated prompt -> answer rows;
4. export the fine-tuned checkpoint and ask the same held-out prompts again.

Prompts are rendered with the chat template and its generation prompt, as the server renders a
``/v1/chat/completions`` request, so the answer is what the model says before its end of turn.
A reply counts as right when its first word is the expected one.

    python scripts/finetune_demo.py --work runs/finetune-demo
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ACTIONS = {"red": "stop", "green": "go", "yellow": "wait", "blue": "swim"}
FILLER = (
    "the a small old river house quiet near over morning train window garden cloud stone paper "
    "music road field little bright cold warm slow fast bird tree lamp chair door"
).split()


def toy_prompt(rng: random.Random) -> tuple[str, str]:
    """A prompt of 3-9 filler words with one colour at a random place, and its answer."""
    colour = rng.choice(sorted(ACTIONS))
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 9))]
    words.insert(rng.randint(0, len(words)), colour)
    return " ".join(words) + "?", ACTIONS[colour]


def toy_rows(n: int, seed: int, exclude: set[str] | None = None) -> list[dict[str, str]]:
    """``n`` distinct prompt/completion rows, none of whose prompts is in ``exclude``."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    rows = []
    while len(rows) < n:
        prompt, answer = toy_prompt(rng)
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "completion": answer})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def pretrain_cli(*argv: str, quiet: bool = False) -> str:
    """Run ``pretrain ARGV...`` in this process; return what it printed when ``quiet``."""
    from pretrain.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out) if quiet else contextlib.nullcontext():
        code = main(list(argv))
    if code != 0:
        raise SystemExit(f"pretrain {' '.join(argv)} failed with exit code {code}")
    return out.getvalue()


def ask(export_dir: Path, prompt: str, max_tokens: int = 6) -> str:
    """The model's greedy reply to ``prompt`` as a chat user turn, through ``pretrain generate``."""
    from pretrain.sft import ChatTemplate

    rendered = ChatTemplate().render(
        [{"role": "user", "content": prompt}], add_generation_prompt=True
    )
    argv = ["generate", str(export_dir), "--prompt", rendered, "--temperature", "0"]
    argv += ["--max-tokens", str(max_tokens), "--device", "cpu"]
    return pretrain_cli(*argv, quiet=True).strip()


def is_right(reply: str, answer: str) -> bool:
    words = reply.split()
    return bool(words) and words[0].strip(".,!?") == answer


def accuracy(export_dir: Path, rows: list[dict[str, str]], label: str) -> tuple[float, list]:
    replies = []
    for i, row in enumerate(rows):
        replies.append((row["prompt"], row["completion"], ask(export_dir, row["prompt"])))
        if (i + 1) % 25 == 0:
            print(f"  {label}: asked {i + 1}/{len(rows)}", flush=True)
    right = sum(is_right(reply, answer) for _, answer, reply in replies)
    return right / len(rows), replies


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(export_dir: Path, log_path: Path, timeout: float = 300.0):
    """``pretrain serve EXPORT`` on a free loopback port; yields its base URL once healthy."""
    import os
    import subprocess

    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "pretrain.cli", "serve", str(export_dir), "--port", str(port)]
    cmd += ["--device", "cpu", "--log-level", "warning"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"pretrain serve exited early; see {log_path}")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"pretrain serve was not ready in {timeout:.0f}s; see {log_path}"
                    )
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def server_accuracy(
    url: str, rows: list[dict[str, str]], max_tokens: int = 6
) -> tuple[float, list]:
    """Greedy ``/v1/chat/completions`` replies to every prompt, sent 16 at a time."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    def chat(row: dict[str, str]) -> str:
        body = {
            "messages": [{"role": "user", "content": row["prompt"]}],
            "temperature": 0,
            "max_tokens": max_tokens,
        }
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"].strip()

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(chat, rows))
    triples = [(r["prompt"], r["completion"], reply) for r, reply in zip(rows, replies)]
    right = sum(is_right(reply, answer) for _, answer, reply in triples)
    return right / len(rows), triples


def export(run_or_checkpoint: Path, out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    pretrain_cli("export", str(run_or_checkpoint), "--out", str(out), quiet=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", default="runs/finetune-demo", help="directory for every output")
    p.add_argument(
        "--base", default=None, help="start from this checkpoint or export (no pretraining)"
    )
    p.add_argument(
        "--data", default="data/stdlib", help="prepared corpus for the brief pretraining"
    )
    p.add_argument("--pretrain-config", default="configs/tiny.toml")
    p.add_argument("--pretrain-steps", type=int, default=100)
    p.add_argument(
        "--pretrain-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a pretraining override, e.g. model.vocab_size=512 (repeatable)",
    )
    p.add_argument("--rows", type=int, default=2000, help="fine-tuning rows to generate")
    p.add_argument("--eval-rows", type=int, default=100, help="held-out prompts to ask")
    p.add_argument("--config", default="configs/sft-tiny.toml", help="fine-tuning recipe")
    p.add_argument(
        "overrides", nargs="*", help="fine-tuning overrides, after --: -- --train.lr 1e-3"
    )
    args = p.parse_args(argv)
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    if args.base:
        base = Path(args.base)
    else:
        print(f"==> pretraining {args.pretrain_config} for {args.pretrain_steps} steps", flush=True)
        base = work / "base"
        pretrain_cli(
            "train", "--config", args.pretrain_config, "--data", args.data, "--out", str(base),
            "--train.steps", str(args.pretrain_steps), *(f"--{kv}" for kv in args.pretrain_set),
        )  # fmt: skip
    timings["pretrain_s"] = time.perf_counter() - start
    base_export = base if (base / "config.json").is_file() else export(base, work / "base-export")

    train_rows = toy_rows(args.rows, seed=1)
    held_out = toy_rows(args.eval_rows, seed=2, exclude={r["prompt"] for r in train_rows})
    write_jsonl(train_rows, work / "train.jsonl")
    write_jsonl(held_out, work / "held_out.jsonl")

    print(f"==> asking the base model {len(held_out)} held-out prompts", flush=True)
    before, before_replies = accuracy(base_export, held_out, "before")
    with server(base_export, work / "serve-base.log") as url:
        before_served, _ = server_accuracy(url, held_out)

    print(f"==> fine-tuning on {len(train_rows)} rows", flush=True)
    start = time.perf_counter()
    pretrain_cli(
        "finetune", "--init-from", str(base), "--data", str(work / "train.jsonl"),
        "--out", str(work / "sft"), "--config", args.config, *args.overrides,
    )  # fmt: skip
    timings["finetune_s"] = time.perf_counter() - start
    sft_export = export(work / "sft", work / "sft-export")

    print(f"==> asking the fine-tuned model the same {len(held_out)} prompts", flush=True)
    after, after_replies = accuracy(sft_export, held_out, "after")
    print("==> and through pretrain serve (/v1/chat/completions)", flush=True)
    with server(sft_export, work / "serve-sft.log") as url:
        after_served, served_replies = server_accuracy(url, held_out)

    result = {
        "accuracy_before": before,
        "accuracy_after": after,
        "served_accuracy_before": before_served,
        "served_accuracy_after": after_served,
        "served_equals_generate": [r[2] for r in served_replies] == [r[2] for r in after_replies],
        "held_out": len(held_out),
        "train_rows": len(train_rows),
        **timings,
        "examples_before": before_replies[:5],
        "examples_after": after_replies[:5],
    }
    (work / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\nprompt -> expected | before | after")
    for (prompt, answer, b), (_, _, a) in zip(before_replies[:5], after_replies[:5]):
        print(f"  {prompt} -> {answer} | {b!r} | {a!r}")
    print("\nheld-out accuracy (first word of the greedy reply):")
    print(f"  pretrain generate: before {before:.0%}, after {after:.0%}")
    print(f"  pretrain serve:    before {before_served:.0%}, after {after_served:.0%}")
    return result


if __name__ == "__main__":
    main()
