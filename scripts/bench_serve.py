"""Benchmark ``pretrain serve``: latency and throughput at several concurrencies, with baselines.

One run measures, on the same export and the same prompts:

- our server (continuous batching) at concurrency 1, 4, 16, 64, streamed completions;
- the same engine serving one request at a time (``--max-batch 1``) under the same concurrency
  (one request per client, since it is slow);
- Hugging Face transformers ``generate`` on the same export, one stream, and our engine
  in-process on the same prompts (single-stream decode speed without HTTP).

Metrics follow vLLM's benchmark definitions: TTFT (request sent to first token received), TPOT
((e2e - TTFT) / (output tokens - 1)), ITL (gaps between streamed chunks), e2e latency, request
and output-token throughput (completed / wall time of the level). Each level runs ``--repeats``
times; the table gives the median over repeats. JSON with every repeat goes to ``--out``.

    python scripts/bench_serve.py                       # random tiny model (configs/tiny.toml)
    python scripts/bench_serve.py --export models/tiny  # a trained export
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_random_export(out: Path) -> Path:
    """configs/tiny.toml's model with random weights and a BPE trained on stdlib sources."""
    import torch

    from pretrain.config import load_config
    from pretrain.data import default_corpus_files
    from pretrain.export import save_export
    from pretrain.model import Transformer
    from pretrain.tokenizer import train_tokenizer

    cfg = load_config(ROOT / "configs" / "tiny.toml").model
    texts = [p.read_text(errors="replace") for p in default_corpus_files()[:300]]
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    torch.manual_seed(0)
    return save_export(Transformer(cfg), tokenizer, out)


def prompts_for(export: Path, n: int, prompt_tokens: int) -> list[list[int]]:
    """n different prompts of exactly ``prompt_tokens`` ids, cut from stdlib source text."""
    from pretrain.data import default_corpus_files
    from pretrain.tokenizer import load_tokenizer

    tok = load_tokenizer(export)
    prompts = []
    for path in default_corpus_files()[500:]:
        ids = tok.encode(path.read_text(errors="replace")).ids
        for start in range(0, len(ids) - prompt_tokens, prompt_tokens * 7):
            prompts.append(ids[start : start + prompt_tokens])
            if len(prompts) == n:
                return prompts
    raise RuntimeError("not enough text for the prompts")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, export: Path, max_batch: int, max_queue: int, threads: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "pretrain.cli", "serve", str(export), "--port", str(self.port)]
        cmd += ["--max-batch", str(max_batch), "--max-queue", str(max_queue)]
        cmd += ["--log-level", "warning", "--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the server exited during start-up")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server did not start in 300 s")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)


async def one_request(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> dict:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    chunk_times, output_tokens = [], 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event["choices"]:
                chunk_times.append(time.perf_counter())
            if event.get("usage"):
                output_tokens = event["usage"]["completion_tokens"]
    done = time.perf_counter()
    ttft = chunk_times[0] - sent
    e2e = done - sent
    return {
        "ttft": ttft,
        "e2e": e2e,
        "tpot": (e2e - ttft) / (output_tokens - 1) if output_tokens > 1 else 0.0,
        "itl": [b - a for a, b in zip(chunk_times, chunk_times[1:])],
        "output_tokens": output_tokens,
    }


async def run_level(url: str, prompts, concurrency: int, max_tokens: int) -> dict:
    """Send every prompt with at most ``concurrency`` requests in flight."""
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        semaphore = asyncio.Semaphore(concurrency)

        async def bounded(p):
            async with semaphore:
                return await one_request(client, p, max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(p) for p in prompts))
        wall = time.perf_counter() - start
    return summarize(results, wall)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50": q[49], "p90": q[89], "p99": q[98]}


def summarize(results: list[dict], wall: float) -> dict:
    tokens = sum(r["output_tokens"] for r in results)
    return {
        "requests": len(results),
        "wall_s": wall,
        "request_throughput": len(results) / wall,
        "output_token_throughput": tokens / wall,
        "ttft_s": percentiles([r["ttft"] for r in results]),
        "tpot_s": percentiles([r["tpot"] for r in results]),
        "itl_s": percentiles([x for r in results for x in r["itl"]]),
        "e2e_s": percentiles([r["e2e"] for r in results]),
    }


def median_of(repeats: list[dict]) -> dict:
    """The median over repeats of every number in the summaries."""
    out = {}
    for key, value in repeats[0].items():
        if isinstance(value, dict):
            out[key] = {k: statistics.median(r[key][k] for r in repeats) for k in value}
        else:
            out[key] = statistics.median(r[key] for r in repeats)
    return out


def single_stream(export: Path, prompts, max_tokens: int, repeats: int, threads: int) -> dict:
    """Decode tokens/s of one stream: transformers generate vs our engine in-process, with the
    same number of threads as the server."""
    import torch

    torch.set_num_threads(threads)
    from transformers import LlamaForCausalLM

    from pretrain.serve.engine import Engine, SamplingParams
    from pretrain.serve.server import load_model

    hf = LlamaForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    loaded = load_model(export, device="cpu")
    engine = Engine(loaded.model, loaded.tokenizer, eos_ids=loaded.eos_ids, max_batch=64)
    hf_rates, ours_rates = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = 0
        with torch.no_grad():
            for p in prompts:
                out = hf.generate(
                    torch.tensor([p]),
                    max_new_tokens=max_tokens,
                    min_new_tokens=max_tokens,
                    do_sample=False,
                    pad_token_id=loaded.eos_ids[0],
                )
                n += out.shape[1] - len(p)
        hf_rates.append(n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        n = 0
        for p in prompts:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            n += len(engine.generate(p, params))
        ours_rates.append(n / (time.perf_counter() - t0))
    return {
        "transformers_tokens_per_s": statistics.median(hf_rates),
        "engine_tokens_per_s": statistics.median(ours_rates),
        "engine_decode_batch_sizes": engine.batch_sizes,
        "repeats": {"transformers": hf_rates, "engine": ours_rates},
    }


def table(results: dict) -> str:
    rows = [
        "| serving | concurrency | req/s | output tok/s | TTFT p50/p90/p99 (ms) "
        "| TPOT p50/p90/p99 (ms) | ITL p50/p90/p99 (ms) | e2e p50/p90/p99 (s) |",
        "|---|---:|---:|---:|---|---|---|---|",
    ]

    def ms(d):
        return f"{d['p50'] * 1e3:.1f} / {d['p90'] * 1e3:.1f} / {d['p99'] * 1e3:.1f}"

    def s(d):
        return f"{d['p50']:.2f} / {d['p90']:.2f} / {d['p99']:.2f}"

    for name, levels in (
        ("continuous batching", results["batched"]),
        ("batch-1, sequential", results["sequential"]),
    ):
        for c, m in levels.items():
            m = m["median"]
            rows.append(
                f"| {name} | {c} | {m['request_throughput']:.2f} | "
                f"{m['output_token_throughput']:.0f} | {ms(m['ttft_s'])} | {ms(m['tpot_s'])} | "
                f"{ms(m['itl_s'])} | {s(m['e2e_s'])} |"
            )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, help="export to serve (default: random tiny)")
    parser.add_argument("--concurrency", default="1,4,16,64", help="levels (1,4,16,64)")
    parser.add_argument("--baseline-concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=0, help="per level (0: max(8, 2 x c))")
    parser.add_argument("--single-stream-prompts", type=int, default=4)
    parser.add_argument(
        "--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="model threads"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "bench_serve.json")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        export = args.export or build_random_export(Path(tmp) / "tiny-random")
        n_max = max(args.requests or max(8, 2 * c) for c in levels + [args.baseline_concurrency])
        prompts = prompts_for(export, n_max, args.prompt_tokens)
        results = {
            "date": time.strftime("%Y-%m-%d"),
            "hardware": f"{os.cpu_count()}-core CPU ({platform.machine()})",
            "export": str(args.export or "random configs/tiny.toml model"),
            "prompt_tokens": args.prompt_tokens,
            "output_tokens": args.output_tokens,
            "repeats": args.repeats,
            "threads": args.threads,
            "batched": {},
            "sequential": {},
        }
        for name, max_batch, cs in (
            ("batched", max(levels), levels),
            ("sequential", 1, [args.baseline_concurrency]),
        ):
            server = Server(export, max_batch, 4 * max(levels), args.threads)
            try:
                asyncio.run(run_level(server.url, prompts[:2], 1, 8))  # warm-up
                for c in cs:
                    # The one-at-a-time baseline gets one request per client (it is slow).
                    n = args.requests or (c if max_batch == 1 else max(8, 2 * c))
                    reps = []
                    for r in range(args.repeats):
                        reps.append(
                            asyncio.run(run_level(server.url, prompts[:n], c, args.output_tokens))
                        )
                        print(
                            f"{name} c={c} repeat {r + 1}: "
                            f"{reps[-1]['output_token_throughput']:.0f} output tok/s",
                            flush=True,
                        )
                    results[name][c] = {"median": median_of(reps), "repeats": reps}
            finally:
                server.close()
        results["single_stream"] = single_stream(
            export,
            prompts[: args.single_stream_prompts],
            args.output_tokens,
            args.repeats,
            args.threads,
        )

    b = results["batched"]
    ratios = {}
    if 1 in b and 16 in b:
        ratios["c16_over_c1_output_tok_s"] = (
            b[16]["median"]["output_token_throughput"] / b[1]["median"]["output_token_throughput"]
        )
    bc = args.baseline_concurrency
    if bc in b:
        ratios[f"batched_over_sequential_at_c{bc}"] = (
            b[bc]["median"]["output_token_throughput"]
            / results["sequential"][bc]["median"]["output_token_throughput"]
        )
    ss = results["single_stream"]
    ratios["engine_over_transformers_single_stream"] = (
        ss["engine_tokens_per_s"] / ss["transformers_tokens_per_s"]
    )
    if 1 in b:
        ratios["server_c1_over_transformers_single_stream"] = (
            b[1]["median"]["output_token_throughput"] / ss["transformers_tokens_per_s"]
        )
    results["ratios"] = ratios
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(results, indent=2))
    os.replace(tmp_out, args.out)

    print()
    print(table(results))
    print()
    print(
        f"single stream decode: transformers {ss['transformers_tokens_per_s']:.0f} tok/s, "
        f"our engine {ss['engine_tokens_per_s']:.0f} tok/s"
    )
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
