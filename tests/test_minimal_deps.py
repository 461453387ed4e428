"""Prepare and train with nothing but torch, triton, numpy, tokenizers and safetensors.

A GPU machine often has only those (scripts/gpu_check.sh runs from the checkout with no install),
so ``pretrain prepare`` on text files and ``pretrain train`` must not import any other package.
The check is real: the subprocesses make every other optional dependency of the project
unimportable, then prepare a dataset and train on it.

Run by hand (the same blocked imports):  python tests/test_minimal_deps.py MODULE [ARGS...]
e.g.  PYTHONPATH=. python tests/test_minimal_deps.py pretrain.cli prepare --out /tmp/d
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import threading

BLOCKED = {
    "datasets", "xxhash", "wandb", "tqdm", "matplotlib", "fastapi", "uvicorn", "transformers",
    "httpx", "openai", "prometheus_client", "jinja2",
}  # fmt: skip


def block_imports() -> None:
    """Make the ``BLOCKED`` packages look uninstalled to this process.

    A ``None`` entry in ``sys.modules`` makes ``import X`` (and ``X.sub``) raise
    ModuleNotFoundError and ``importlib.util.find_spec("X")`` return None, exactly as for a
    package that is not installed (torch probes optional packages that way).
    """
    already = BLOCKED & {name.partition(".")[0] for name in sys.modules}
    assert not already, f"imported before blocking: {sorted(already)}"
    for name in BLOCKED:
        sys.modules[name] = None


def run_module_without_optional_packages(module: str, args: list[str]) -> None:
    """Run ``python -m MODULE ARGS`` in this process with the ``BLOCKED`` packages unimportable."""
    block_imports()
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def run_blocked(module: str, *args: str, terminal: bool = False, timeout: int = 120) -> str:
    """Run MODULE with the blocked imports in a subprocess; return its stderr.

    ``terminal``: stderr is a pseudo-terminal, as in an interactive shell, where progress bars
    would be drawn.
    """
    from train_helpers import ROOT, env

    master, slave = os.openpty() if terminal else (None, subprocess.PIPE)
    proc = subprocess.Popen(
        [sys.executable, __file__, module, *args],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=slave,
    )
    if terminal:
        os.close(slave)
        chunks: list[bytes] = []
        reader = threading.Thread(target=_drain, args=(master, chunks))
        reader.start()
        proc.wait(timeout=timeout)
        reader.join()
        stderr = b"".join(chunks)
    else:
        stderr = proc.communicate(timeout=timeout)[1]
    text = stderr.decode(errors="replace")
    assert proc.returncode == 0, f"{module} {args} exited {proc.returncode}:\n{text[-4000:]}"
    return text


def _drain(fd: int, chunks: list[bytes]) -> None:
    """Read a pseudo-terminal until its other end closes (so the child never blocks on it)."""
    try:
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    except OSError:  # EIO: every writer has exited
        pass
    finally:
        os.close(fd)


def test_blocked_packages_are_really_unimportable():
    code = (
        "import importlib.util, tokenizers, safetensors, numpy\n"
        "assert importlib.util.find_spec('tqdm') is None\nimport xxhash"
    )
    proc = subprocess.run(
        [sys.executable, __file__, "runpy", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0 and "ModuleNotFoundError: import of xxhash halted" in proc.stderr


def test_prepare_and_train_need_only_the_core_packages(tmp_path):
    from conftest import write_tiny_corpus
    from train_helpers import TINY, records

    write_tiny_corpus(tmp_path / "corpus", num_docs=60)
    data = tmp_path / "data"
    run_blocked(
        "pretrain.cli", "prepare", "--out", str(data), "--input", str(tmp_path / "corpus" / "*.txt"),
        "--vocab-size", "512", "--val-fraction", "0.1", "--num-proc", "1",
    )  # fmt: skip
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["checksum_algorithm"] == "blake2b_64"  # xxhash was not importable
    assert manifest["stats"]["documents"]["train"] + manifest["stats"]["documents"]["val"] == 60

    run = tmp_path / "run"
    run_blocked(
        "pretrain.train", "--data", str(data), "--out", str(run), *TINY,
        "--model.vocab_size", str(manifest["vocab_size"]),  # a small corpus learns < 512 tokens
        "--train.steps", "3", "--eval.every", "3", "--checkpoint.every", "3",
        terminal=True,  # where a progress bar would be drawn if tqdm were there
    )  # fmt: skip
    assert [r["step"] for r in records(run)] == [1, 2, 3]
    assert [r["step"] for r in records(run, "eval")] == [0, 3]
    assert (run / "checkpoints" / "step-000003" / ".metadata").is_file()


if __name__ == "__main__":
    if sys.argv[1] == "runpy":  # python tests/test_minimal_deps.py runpy -c CODE
        block_imports()
        exec(sys.argv[3])
    else:
        run_module_without_optional_packages(sys.argv[1], sys.argv[2:])
