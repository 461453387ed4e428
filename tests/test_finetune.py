"""``pretrain finetune`` end to end on small real models: init, shape, errors, resume, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from finetune_helpers import (
    colour_rows,
    make_export,
    make_tokenizer,
    small_model_config,
    write_rows,
)

from pretrain import cli
from pretrain.config import load_config
from pretrain.export import load_export

# Short runs: a few steps of a 2-layer, 32-wide model, no periodic evaluation or checkpoints.
FAST = ["--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--eval.every", "0"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ft")
    tok = make_tokenizer(root / "tok" / "tokenizer.json")
    cfg = small_model_config(vocab_size=400)
    return {
        "root": root,
        "export": make_export(root / "base-export", tok, cfg),
        "data": write_rows(root / "rows.jsonl", colour_rows(120)),
    }


def finetune(*argv: str) -> int:
    return cli.main(["finetune", *map(str, argv)])


def weights_of_run(run: Path) -> dict[str, torch.Tensor]:
    """The run's latest weights, through ``pretrain export`` (as a user would get them)."""
    out = run.parent / (run.name + "-export")
    assert cli.main(["export", str(run), "--out", str(out)]) == 0
    _, state, _ = load_export(out)
    return state


def test_finetune_from_export_is_a_normal_run(base, tmp_path, capsys):
    run = tmp_path / "sft"
    code = finetune(
        "--init-from", base["export"], "--data", base["data"], "--out", run,
        "--train.steps", "3", *FAST,
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "rows.jsonl: 120 rows" in printed and "train: 114 examples" in printed
    # The shape came from the export, not from the recipe's defaults.
    saved = load_config(run / "config.toml")
    assert (saved.model.d_model, saved.model.n_layers, saved.model.vocab_size) == (32, 2, 400)
    assert saved.model.doc_mask and saved.train.steps == 3
    summary = json.loads((run / "finetune_data.json").read_text())
    assert summary["train"]["kept"] == 114 and summary["val"]["kept"] == 6
    # Export works on it unchanged, and the weights moved away from the init's.
    _, init_state, _ = load_export(base["export"])
    tuned = weights_of_run(run)
    assert set(tuned) == set(init_state)
    assert not torch.equal(
        tuned["layers.0.mlp.up_proj.weight"], init_state["layers.0.mlp.up_proj.weight"]
    )


def test_finetune_from_a_checkpoint_reads_its_shape(base, tmp_path):
    first = tmp_path / "first"
    assert (
        finetune(
            "--init-from",
            base["export"],
            "--data",
            base["data"],
            "--out",
            first,
            "--train.steps",
            "1",
            *FAST,
        )
        == 0
    )
    second = tmp_path / "second"
    assert (
        finetune(
            "--init-from",
            first,
            "--data",
            base["data"],
            "--out",
            second,
            "--train.steps",
            "1",
            *FAST,
        )
        == 0
    )
    assert load_config(second / "config.toml").model.d_model == 32


def test_epochs_set_the_number_of_steps(base, tmp_path):
    run = tmp_path / "epochs"
    code = finetune(
        "--init-from", base["export"], "--data", base["data"], "--out", run,
        "--finetune.epochs", "2", "--train.global_batch_size", "2", "--train.micro_batch_size", "2",
        "--eval.every", "0",
    )  # fmt: skip
    assert code == 0
    summary = json.loads((run / "finetune_data.json").read_text())
    assert summary["steps"] == -(-2 * summary["rows_per_epoch"] // 2)
    assert load_config(run / "config.toml").train.steps == summary["steps"]


def test_model_shape_that_disagrees_with_the_init_is_an_error(base, tmp_path, capsys):
    code = finetune(
        "--init-from", base["export"], "--data", base["data"], "--out", tmp_path / "x",
        "--model.d_model", "64",
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "model.d_model = 64" in err and "has 32" in err and "--init-from" in err
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[model]\nn_layers = 2\nn_heads = 8\n")
    code = finetune(
        "--init-from", base["export"], "--data", base["data"], "--out", tmp_path / "y",
        "--config", recipe,
    )  # fmt: skip
    assert code == 2
    assert "model.n_heads = 8" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_bad_row_stops_with_file_and_line_unless_skipped(base, tmp_path, capsys):
    rows = write_rows(
        tmp_path / "bad.jsonl", [*colour_rows(20), '{"prompt": "x"', *colour_rows(20)]
    )
    args = ["--init-from", base["export"], "--data", rows, "--train.steps", "1", *FAST]
    assert finetune(*args, "--out", tmp_path / "a") == 2
    assert f"{rows}:21: not valid JSON" in capsys.readouterr().err
    assert finetune(*args, "--out", tmp_path / "b", "--skip-bad-rows") == 0
    assert "1 bad rows skipped: 1 not valid JSON" in capsys.readouterr().out
    assert json.loads((tmp_path / "b" / "finetune_data.json").read_text())["skipped"] == {
        "not valid JSON": 1
    }


def test_missing_init_is_an_error(base, tmp_path, capsys):
    assert (
        finetune("--init-from", tmp_path / "nope", "--data", base["data"], "--out", tmp_path / "o")
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_resume_gives_the_uninterrupted_weights(base, tmp_path):
    """Stopped after 2 of 4 steps and resumed, the run ends where an uninterrupted one does."""
    args = ["--init-from", base["export"], "--data", base["data"], "--train.steps", "4", *FAST]
    assert finetune(*args, "--out", tmp_path / "whole") == 0
    assert finetune(*args, "--out", tmp_path / "split", "--train.stop_at", "2") == 0
    assert finetune(*args, "--out", tmp_path / "split", "--checkpoint.resume", "auto") == 0
    whole, split = weights_of_run(tmp_path / "whole"), weights_of_run(tmp_path / "split")
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=0, atol=0)


@pytest.mark.slow
def test_two_torchrun_ranks_match_one_process(base, tmp_path):
    """``torchrun -m pretrain.finetune`` on 2 gloo ranks: each reads its share of every batch."""
    import subprocess
    import sys

    from train_helpers import ROOT, assert_losses_close, env, losses

    args = ["--init-from", str(base["export"]), "--data", str(base["data"]), "--train.steps", "3"]
    args += [*FAST, "--eval.every", "3", "--logging.every", "1"]
    assert finetune(*args, "--out", tmp_path / "w1") == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "pretrain.finetune", *args, "--out", str(tmp_path / "w2")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_losses_close(losses(tmp_path / "w1"), losses(tmp_path / "w2"), rtol=1e-4)
