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


# --------------------------------------------------------------------------- value ranges


def _value(key):
    """The default of a dotted key, however deep (``finetune.lora.rank``)."""
    value = Config()
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _numeric_keys():
    """Every int and float key of every section (list keys are checked item by item)."""
    from pretrain.config import all_keys

    return [k for k in all_keys() if type(_value(k)) in (int, float)]


@pytest.mark.parametrize("key", _numeric_keys())
def test_every_numeric_key_refuses_a_negative_value_naming_it(key):
    bad = "-2" if _value(key) == -1 else "-1"  # -1 is the "the rest" sentinel of some keys
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"--{key}", bad])
    assert str(e.value).startswith(f"{key} must be ") and f"got {bad}" in str(e.value)


@pytest.mark.parametrize("key", [k for k in _numeric_keys() if isinstance(_value(k), float)])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_every_float_key_refuses_a_non_finite_value(key, value):
    with pytest.raises(ConfigError, match=rf"^{key} must be a finite number, got {value}"):
        load_config(None, [f"--{key}", value])


@pytest.mark.parametrize(
    "key",
    ["train.schedule", "train.device", "train.dtype", "train.kernels",
     "train.activation_checkpointing", "optimizer.name", "optimizer.muon_adjust_lr"],
)  # fmt: skip
def test_every_choice_key_lists_what_is_allowed(key):
    with pytest.raises(ConfigError, match=rf"^{key} must be one of .*, got 'bogus'$"):
        load_config(None, [f"--{key}", "bogus"])


def test_a_choice_set_in_code_is_checked_against_its_annotation():
    from pretrain.config import validate_config

    cfg = load_config(None, ["--optimizer.name", "muon"])
    assert cfg.optimizer.name == "muon" and cfg.optimizer.muon_momentum == 0.95
    cfg.train.schedule = "exp"
    with pytest.raises(ConfigError, match=r"^train\.schedule must be one of cosine, linear, wsd"):
        validate_config(cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--model.n_heads", "0"], "model.n_heads must be >= 1, got 0"),
        (["--model.n_kv_heads", "0"], "model.n_kv_heads must be >= 1, got 0"),
        (["--train.lr", "0"], "train.lr must be > 0, got 0.0"),
        (["--eval.batches", "0"], "eval.batches must be >= 1, got 0"),
        (["--train.min_lr_ratio", "1.5"], "train.min_lr_ratio must be in [0, 1], got 1.5"),
        (["--optimizer.beta2", "1"], "optimizer.beta2 must be in [0, 1), got 1.0"),
        (["--checkpoint.keep_steps", "[5, 0]"], "checkpoint.keep_steps must be a list of steps"),
        (["--train.diverge_loss_factor", "0.5"], "train.diverge_loss_factor must be > 1"),
        (["--model.vocab_size", "1"], "model.vocab_size must be >= 2, got 1"),
    ],
)
def test_out_of_range_values_name_the_key_the_value_and_the_range(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value).startswith(message)


def test_edge_values_that_mean_off_or_all_are_accepted():
    cfg = load_config(None, ["--eval.every", "0", "--checkpoint.keep_last", "0",
                             "--train.grad_clip", "0", "--train.diverge_loss_factor", "0",
                             "--train.seed", "0", "--train.warmup_steps", "0"])  # fmt: skip
    assert cfg.checkpoint.keep_last == 0 and cfg.train.diverge_loss_factor == 0


def test_a_bad_value_in_a_file_is_refused_like_an_override(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[checkpoint]\nkeep_last = -1\n")
    with pytest.raises(ConfigError, match=r"^checkpoint\.keep_last must be >= 0"):
        load_config(path)


@pytest.mark.parametrize(
    "key, value", [("model.n_heads", "0"), ("train.lr", "-1"), ("train.seed", "-1")]
)
def test_cli_refuses_a_bad_value_in_one_line_before_any_work(tmp_path, key, value):
    """The data directory does not exist: a value error that comes first was found at load."""
    r = _cli("train", "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "run"),
             f"--{key}", value)  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pretrain train: error: {key} must be ")
    assert f"got {value}" in lines[0]
    assert not (tmp_path / "run").exists()
