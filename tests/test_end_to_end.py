"""Every stage through the real command line, as a user runs it, each in a process of its own.

prepare -> train -> plot -> export -> serve (completion and chat through the ``openai`` client,
the greedy answer checked against ``pretrain generate``) -> finetune from the checkpoint ->
export -> serve the fine-tuned model. Small shapes keep it to well under a minute on a CPU.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, write_tiny_corpus
from finetune_helpers import colour_rows, write_rows
from serve_helpers import ServerProcess

# A 2-layer, 64-wide model over a 512-token vocabulary: the stages, not the model, are on trial.
TRAIN_ARGS = [
    "--config", "configs/tiny.toml",
    "--model.vocab_size", "512", "--model.n_layers", "2", "--model.d_model", "64",
    "--model.n_heads", "4", "--model.n_kv_heads", "2", "--model.max_seq_len", "128",
    "--data.seq_len", "64", "--train.steps", "40", "--train.warmup_steps", "5",
    "--train.global_batch_size", "8", "--train.micro_batch_size", "8",
    "--eval.every", "20", "--eval.batches", "2", "--logging.every", "10",
    "--checkpoint.every", "20",
]  # fmt: skip
FINETUNE_ARGS = [
    "--train.steps", "100", "--train.warmup_steps", "5", "--train.lr", "3e-3",
    "--train.global_batch_size", "8", "--train.micro_batch_size", "8", "--data.seq_len", "64",
    "--eval.every", "0", "--checkpoint.every", "100",
]  # fmt: skip
PROMPT = "The model learns"
MAX_TOKENS = 12
# The rule of the fine-tuning rows is that a colour asks for its word (red: stop, green: go, ...);
# this prompt is not one of the rows, so answering it takes the rule, not a memorised row.
RULE_PROMPT = "the river house green?"


def cli_env() -> dict[str, str]:
    """The environment a user's shell would give: no Triton interpreter, offline W&B."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    env.pop("TRITON_INTERPRET", None)
    return env


def pretrain(*args: str | Path, timeout: float = 300) -> str:
    """Run ``python -m pretrain.cli ARGS``; fail with its output unless it exits 0; return stdout."""
    cmd = [sys.executable, "-m", "pretrain.cli", *map(str, args)]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    )
    return proc.stdout


def stop_server(server: ServerProcess) -> None:
    """SIGTERM, as a service manager would; the server must drain and exit cleanly."""
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(timeout=60)
    output = server.output()
    server.stop()
    assert code == 0, f"the server exited {code} on SIGTERM:\n{output}"


def openai_client(server: ServerProcess):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60, max_retries=0)


def model_name(client) -> str:
    """The one model a server serves, as the client lists it."""
    (model,) = client.models.list().data
    return model.id


def check_completion(client, export: Path) -> None:
    from pretrain.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(export / "tokenizer.json")
    r = client.completions.create(
        model=model_name(client), prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0
    )
    choice = r.choices[0]
    assert choice.text.strip(), r
    assert choice.finish_reason in ("length", "stop")
    prompt_ids = tokenizer.encode(PROMPT, add_special_tokens=False).ids
    assert r.usage.prompt_tokens == len(prompt_ids)
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == MAX_TOKENS
    else:
        assert 1 <= r.usage.completion_tokens < MAX_TOKENS
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # The server's greedy answer is the command line's greedy answer.
    generated = pretrain(
        "generate", export, "--prompt", PROMPT, "--max-tokens", MAX_TOKENS, "--temperature", "0"
    )
    assert generated == choice.text + "\n"


def chat(client, content: str, max_tokens: int = 16):
    r = client.chat.completions.create(
        model=model_name(client),
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0,
    )
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens > len(content.split())  # the chat template adds its markers
    return r


def test_every_stage_from_the_command_line(tmp_path):
    # prepare: a small generated corpus into checksummed shards with a 512-token tokenizer.
    write_tiny_corpus(tmp_path / "corpus")
    data = tmp_path / "data"
    pretrain("prepare", "--out", data, "--input", tmp_path / "corpus", "--vocab-size", "512")
    assert (data / "manifest.json").is_file() and (data / "tokenizer.json").is_file()

    # train, then plot the run's curves.
    run = tmp_path / "run"
    pretrain("train", "--data", data, "--out", run, *TRAIN_ARGS)
    assert (run / "metrics.jsonl").is_file()
    pretrain("plot", run)
    assert (run / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # export and serve: a completion and a chat answer through the official client.
    export = tmp_path / "export"
    pretrain("export", run, "--out", export)
    server = ServerProcess(export, log_path=tmp_path / "serve.log")
    try:
        client = openai_client(server.wait_ready())
        check_completion(client, export)
        assert chat(client, "What does the model learn?").choices[0].message.content.strip()
        assert chat(client, RULE_PROMPT, max_tokens=4).choices[0].message.content.strip() != "go"
    finally:
        stop_server(server)

    # finetune from the training checkpoint on prompt/completion rows, export, serve again.
    rows = write_rows(tmp_path / "rows.jsonl", colour_rows(120))
    sft_run = tmp_path / "sft"
    pretrain("finetune", "--init-from", run, "--data", rows, "--out", sft_run, *FINETUNE_ARGS)
    sft_export = tmp_path / "sft-export"
    pretrain("export", sft_run, "--out", sft_export)
    server = ServerProcess(sft_export, log_path=tmp_path / "serve-sft.log")
    try:
        client = openai_client(server.wait_ready())
        answer = chat(client, RULE_PROMPT, max_tokens=4).choices[0].message
        assert answer.content.strip() == "go", answer
    finally:
        stop_server(server)
