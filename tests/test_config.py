"""The config loader: TOML, overrides, unknown keys, wrong types, and the CLI's one-line errors."""

import subprocess
import sys

import pytest

from pretrain.config import Config, ConfigError, config_to_toml, load_config, parse_overrides


def test_defaults_then_file_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nlr = 0.01\nsteps = 7\n[model]\nn_layers = 3\n")
    cfg = load_config(
        path, ["--train.lr", "3e-4", "--model.d_model=128", "--train.compile", "true"]
    )
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.steps == 7  # from the file
    assert cfg.model.n_layers == 3
    assert cfg.model.d_model == 128
    assert cfg.train.compile is True
    assert cfg.data.seq_len == Config().data.seq_len  # untouched default


def test_every_shipped_config_loads(root):
    for name in ["tiny", "gpt2-124m", "llama-1b", "llama-8b"]:
        cfg = load_config(root / "configs" / f"{name}.toml")
        assert cfg.model.n_heads % cfg.model.n_kv_heads == 0


def test_required_key_names_exist():
    cfg = Config()
    for key in [
        "train.steps",
        "train.global_batch_size",
        "train.micro_batch_size",
        "train.lr",
        "train.seed",
        "data.seq_len",
        "eval.every",
        "logging.every",
        "checkpoint.every",
        "checkpoint.resume",
        "checkpoint.init_from",
        "model.n_layers",
        "model.d_model",
        "model.n_heads",
        "model.n_kv_heads",
        "model.vocab_size",
    ]:
        section, name = key.split(".")
        assert hasattr(getattr(cfg, section), name), key


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"train\.lrr.*did you mean 'train\.lr'"):
        load_config(None, ["--train.lrr", "1"])


def test_unknown_section_suggests():
    with pytest.raises(ConfigError, match=r"unknown config section 'trian'.*train\.lr"):
        load_config(None, ["--trian.lr", "1"])


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[model]\nn_layer = 2\n")
    with pytest.raises(ConfigError, match=r"model\.n_layer.*model\.n_layers"):
        load_config(path)


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("train.steps", "ten", "int"),
        ("train.lr", "fast", "float"),
        ("train.compile", "maybe", "bool"),
        ("train.steps", "1.5", "int"),
    ],
)
def test_wrong_type_names_key_value_and_type(key, value, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"--{key}", value])
    msg = str(e.value)
    assert key in msg and value in msg and expected in msg


def test_wrong_type_in_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nsteps = "many"\n')
    with pytest.raises(ConfigError, match=r"train\.steps: expected int, got 'many'"):
        load_config(path)


def test_int_accepts_scientific_notation_and_lists_parse():
    cfg = load_config(None, ["--train.steps", "1e3", "--checkpoint.keep_steps", "[100, 200]"])
    assert cfg.train.steps == 1000
    assert cfg.checkpoint.keep_steps == [100, 200]


def test_missing_file_names_path(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.toml"):
        load_config(tmp_path / "nope.toml")


def test_invalid_model_shape():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        load_config(None, ["--model.n_heads", "8", "--model.n_kv_heads", "3"])


def test_override_without_value():
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--train.lr"])


def test_round_trip_through_toml(tmp_path):
    cfg = load_config(
        None,
        [
            "--train.lr",
            "0.123",
            "--checkpoint.keep_steps",
            "[5]",
            "--logging.wandb_run_name",
            'a"b',
        ],
    )
    path = tmp_path / "resolved.toml"
    path.write_text(config_to_toml(cfg))
    assert load_config(path) == cfg


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "pretrain.cli", *args], capture_output=True, text=True
    )


def test_cli_lists_subcommands():
    r = _cli("--help")
    assert r.returncode == 0
    for sub in ["prepare", "train", "finetune", "export", "serve", "generate", "plot"]:
        assert sub in r.stdout


def test_cli_unknown_subcommand_is_one_line_exit_2():
    r = _cli("trian")
    assert r.returncode == 2
    assert "unknown command 'trian'" in r.stderr
    assert "Traceback" not in r.stderr
