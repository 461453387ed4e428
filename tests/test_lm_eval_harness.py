"""lm-evaluation-harness against a live ``pretrain serve``, offline, as docs/evaluation.md shows.

lm-eval (the optional ``eval`` extra) runs a local multiple-choice task (a YAML over a JSONL file)
with ``--model local-completions`` against the server; its accuracies and per-choice
log-likelihoods must equal those of ``pretrain eval`` on the same file, in process. Slow: it
starts a server and lm-eval, each its own process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from serve_helpers import ServerProcess, make_export

from pretrain.evaluate import evaluate_choices, load_eval_model

pytestmark = pytest.mark.slow

ROWS = [
    {"context": "The cat sat on the", "choices": [" mat.", " moon.", " idea of it."], "answer": 0},
    {"context": "Water boils at", "choices": [" 100 degrees", " cold", " blue"], "answer": 0},
    {"context": "def f(x):\n   ", "choices": [" return x", " import os", " pass"], "answer": 2},
    {"context": "1 2 3 4", "choices": [" 5", " five", " 6 7 8 9 10"], "answer": 0},
    {
        "context": "Question: what is red?\nAnswer:",
        "choices": [" a colour", " a number"],
        "answer": 0,
    },
    {"context": "lorem ipsum dolor", "choices": [" sit amet", " and so on", " x"], "answer": 1},
]

TASK_YAML = """\
task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_lm_eval_local_completions_equals_pretrain_eval(tmp_path):
    pytest.importorskip(
        "lm_eval", reason="lm-eval is not installed: pip install -e '.[eval]' (the eval extra)"
    )
    export = make_export(tmp_path / "tiny")
    data = tmp_path / "toy_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy_mc.yaml").write_text(TASK_YAML.format(data=data))

    server = ServerProcess(export)
    try:
        server.wait_ready()
        model_args = ",".join(
            [
                "model=tiny",
                f"base_url={server.url}/v1/completions",
                "tokenizer_backend=huggingface",
                f"tokenizer={export}",
                "max_length=128",
                "num_concurrent=1",
                "max_retries=1",
            ]
        )
        cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions"]
        cmd += ["--model_args", model_args, "--tasks", "toy_mc", "--include_path", str(tasks)]
        cmd += ["--output_path", str(tmp_path / "out"), "--log_samples"]
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        env |= {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    finally:
        server.stop()

    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]["toy_mc"]
    (samples_file,) = (tmp_path / "out").rglob("samples_toy_mc_*.jsonl")
    samples = sorted(
        (json.loads(line) for line in samples_file.read_text().splitlines()),
        key=lambda s: s["doc_id"],
    )

    ours = evaluate_choices(load_eval_model(export, "cpu"), data)
    assert len(samples) == len(ROWS)
    worst = 0.0
    for sample, row in zip(samples, ours.per_row):
        theirs = [float(resp[0][0]) for resp in sample["resps"]]
        assert theirs == pytest.approx(row["loglikelihoods"], abs=1e-4), sample["doc"]
        worst = max(worst, *(abs(a - b) for a, b in zip(theirs, row["loglikelihoods"])))
    print(f"largest |lm-eval - pretrain eval| log-likelihood: {worst:.2e}")
    assert results["acc,none"] == pytest.approx(ours.acc, abs=1e-12)
    assert results["acc_norm,none"] == pytest.approx(ours.acc_norm, abs=1e-12)
    print(textwrap.shorten(json.dumps(results), 300))
