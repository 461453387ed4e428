"""One forward pass for training, ``pretrain generate`` and the server.

A model with one extra op (QK-norm, added to ``pretrain.model`` by qk_norm_launcher.py in the
subprocesses) must give the same greedy tokens through ``pretrain generate`` and through a live
``pretrain serve``, and other tokens than the model without it: a serving path that computed
attention, a block or the head anywhere but in model.py would miss the op and disagree.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from serve_helpers import ServerProcess, free_port, make_export

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = Path(__file__).with_name("qk_norm_launcher.py")
PROMPT = "import json\n\ndef load(path):"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("one_forward") / "export")


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    return env


def _generate(export: Path, *program: str) -> str:
    """Greedy text of ``pretrain generate``, run as ``python *program generate ...``."""
    cmd = [sys.executable, *program, "generate", str(export), "--prompt", PROMPT]
    cmd += ["--max-tokens", str(MAX_TOKENS), "--temperature", "0", "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout.removesuffix("\n")


class _PatchedServer(ServerProcess):
    """``pretrain serve`` on a free loopback port, run through the launcher."""

    def __init__(self, export_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, str(LAUNCHER), "serve", str(export_dir)]
        cmd += ["--port", str(self.port), "--log-level", "warning"]
        self.log_path = Path(export_dir).parent / f"server-{self.port}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT
        )


def _served(export: Path) -> str:
    server = _PatchedServer(export)
    try:
        server.wait_ready()
        body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]
    finally:
        server.stop()


def test_an_op_added_to_attention_reaches_generate_and_the_server_alike(export):
    patched = _generate(export, str(LAUNCHER))
    assert patched, "the patched model generated nothing to compare"
    assert _generate(export, "-m", "pretrain.cli") != patched  # the op changes the tokens
    assert _served(export) == patched
