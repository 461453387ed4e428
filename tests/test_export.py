"""Export: a trained checkpoint becomes a Hugging Face Llama directory with the same logits.

The reference is transformers' own LlamaForCausalLM loading the export offline: its logits on
random tokens and its greedy continuation must equal ours, for multi-head, grouped-query and
tied-embedding models, whole or sharded. Damaged exports and bad paths are refused by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain import cli
from pretrain.config import Config, ModelConfig, load_config
from pretrain.errors import UserError
from pretrain.export import load_export, load_model, read_export_config, verify_export
from pretrain.generate import generate, stop_token_ids
from pretrain.model import Transformer
from pretrain.tokenizer import CHAT_TEMPLATE, EOS_TOKEN, load_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CONFIGS = {
    "mha": ModelConfig(vocab_size=512, n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, max_seq_len=64),
    "gqa": ModelConfig(vocab_size=512, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=64),
    "tied": ModelConfig(
        vocab_size=512, n_layers=2, d_model=64, n_heads=4, n_kv_heads=1, max_seq_len=64,
        tie_embeddings=True, rope_theta=500000.0,
    ),
}  # fmt: skip
RUN_SETTINGS = {
    "data.seq_len": 32, "train.steps": 3, "train.global_batch_size": 4,
    "train.micro_batch_size": 2, "train.warmup_steps": 1, "train.lr": 1e-2, "train.device": "cpu",
    "eval.every": 0, "logging.every": 100, "checkpoint.every": 0,
}  # fmt: skip


def run_overrides(cfg: ModelConfig, data_dir: Path) -> list[tuple[str, str]]:
    """``(section.key, value)`` pairs for a short training run of ``cfg`` on ``data_dir``."""
    settings = {f"model.{k}": v for k, v in dataclasses.asdict(cfg).items()}
    settings |= RUN_SETTINGS | {"data.path": data_dir}
    return [(k, str(v).lower() if isinstance(v, bool) else str(v)) for k, v in settings.items()]


@pytest.fixture(scope="module")
def tokenizer(tiny_dataset):
    return load_tokenizer(tiny_dataset)


def train_run(cfg: ModelConfig, data_dir: Path, run_dir: Path) -> Path:
    """A few real optimizer steps of the trainer on the prepared data; its checkpoint."""
    from pretrain.train import train

    config = load_config(None, run_overrides(cfg, data_dir))
    with contextlib.redirect_stdout(io.StringIO()):
        return train(config, run_dir).checkpoint


def reference_model(step_dir: Path) -> Transformer:
    """The checkpoint's model as the trainer itself loads weights (not through the exporter)."""
    from pretrain.checkpoint import load_weights
    from pretrain.export import read_checkpoint_config

    model = Transformer(read_checkpoint_config(step_dir))
    load_weights(step_dir, model)
    return model.eval()


def export_cli(*args: str) -> int:
    return cli.main(["export", *map(str, args)])


@pytest.fixture(scope="module")
def exports(tiny_dataset, tmp_path_factory):
    """For each config: (trained model, its export directory written by ``pretrain export``)."""
    out = {}
    for name, cfg in CONFIGS.items():
        base = tmp_path_factory.mktemp(name)
        step_dir = train_run(cfg, tiny_dataset, base / "run")
        model = reference_model(step_dir)
        assert not torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))  # trained
        assert export_cli(base / "run", "--out", base / "export") == 0
        out[name] = (model, base / "export")
    return out


def hf_model(export_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_gives_our_logits_and_greedy_tokens(name, exports):
    model, export_dir = exports[name]
    hf = hf_model(export_dir)
    tokens = torch.randint(
        0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ours.shape == theirs.shape == (2, 40, model.config.vocab_size)
    assert (ours - theirs).abs().max().item() < 1e-4

    reloaded = load_model(export_dir)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens), ours, rtol=0, atol=0)
    assert (reloaded.lm_head.weight is reloaded.embed_tokens.weight) == model.config.tie_embeddings

    prompt = tokens[0, :8].tolist()
    ours_new = generate(
        reloaded, prompt, max_tokens=32, temperature=0, stop_ids=stop_token_ids(export_dir)
    )
    with torch.no_grad():
        theirs_all = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
    assert len(ours_new) == 32
    assert theirs_all[0, len(prompt) :].tolist() == ours_new


def test_export_layout_config_and_checksums(exports, tokenizer):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    for model, export_dir in exports.values():
        cfg = model.config
        files = sorted(p.name for p in export_dir.iterdir())
        assert files == [
            "checksums.sha256", "config.json", "generation_config.json", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json",
        ]  # fmt: skip
        config = json.loads((export_dir / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
        assert (config["hidden_size"], config["intermediate_size"]) == (cfg.d_model, cfg.ffn_dim)
        assert (config["num_attention_heads"], config["num_key_value_heads"]) == (
            cfg.n_heads,
            cfg.n_kv_heads,
        )
        assert config["num_hidden_layers"] == cfg.n_layers and config["head_dim"] == cfg.head_dim
        assert config["rope_theta"] == cfg.rope_theta and config["rms_norm_eps"] == cfg.norm_eps
        assert config["max_position_embeddings"] == cfg.max_seq_len
        assert config["tie_word_embeddings"] == cfg.tie_embeddings
        assert config["eos_token_id"] == config["bos_token_id"] == tokenizer.token_to_id(EOS_TOKEN)
        assert (config["hidden_act"], config["attention_bias"], config["mlp_bias"]) == (
            "silu",
            False,
            False,
        )
        assert config["torch_dtype"] == "float32"
        assert read_export_config(export_dir) == ModelConfig(
            **{**cfg.__dict__, "ffn_hidden": cfg.ffn_dim}
        )

        with safe_open(export_dir / "model.safetensors", "pt") as f:
            names = set(f.keys())
            assert f.metadata() == {"format": "pt"}
        want = {f"model.{k}" for k in model.state_dict() if not k.startswith("lm_head")}
        assert names == (want if cfg.tie_embeddings else want | {"lm_head.weight"})

        listed = dict(
            reversed(line.split("  "))
            for line in (export_dir / "checksums.sha256").read_text().splitlines()
        )
        assert sorted(listed) == [f for f in files if f != "checksums.sha256"]
        for file, digest in listed.items():
            assert hashlib.sha256((export_dir / file).read_bytes()).hexdigest() == digest

    hf_tok = AutoTokenizer.from_pretrained(export_dir)
    text = "The model learns the next token, café ∑"
    assert hf_tok(text).input_ids == tokenizer.encode(text).ids
    assert hf_tok.eos_token == EOS_TOKEN
    assert (
        json.loads((export_dir / "tokenizer_config.json").read_text())["chat_template"]
        == CHAT_TEMPLATE
    )
    chat = [{"role": "user", "content": "hi"}]
    rendered = hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|user|>\nhi<|end|>\n<|assistant|>\n"


def test_sharded_bf16_export(exports, tmp_path):
    model, export_dir = exports["gqa"]
    run_dir = export_dir.parent / "run"
    out = tmp_path / "sharded"
    assert (
        export_cli(
            run_dir / "checkpoints", "--out", out, "--max-shard-size", "40KB", "--dtype", "bf16"
        )
        == 0
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    for shard in shards:  # within the limit (plus its header), or one tensor bigger than it
        tensors = [k for k, v in index["weight_map"].items() if v == shard]
        assert (out / shard).stat().st_size <= 40_000 + 4096 or len(tensors) == 1
    verify_export(out)

    cfg, state_dict, _ = load_export(out)
    assert cfg == read_export_config(export_dir)
    for k, v in model.state_dict().items():
        assert state_dict[k].dtype == torch.bfloat16
        torch.testing.assert_close(state_dict[k], v.to(torch.bfloat16), rtol=0, atol=0)

    tokens = torch.randint(0, cfg.vocab_size, (1, 16))
    hf = hf_model(out)
    bf16 = load_model(out)
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert (hf(tokens).logits - load_model(out, dtype=torch.float32)(tokens)).abs().max() < 1e-4


def test_two_rank_fsdp_checkpoint_exports_like_one_rank(tiny_dataset, tmp_path):
    """``torchrun -m pretrain.train`` on 2 ranks saves sharded; its export must equal the export
    of the same weights saved by one process through the same checkpointer."""
    from pretrain.checkpoint import Checkpointer
    from pretrain.export import resolve_checkpoint
    from pretrain.parallel import DistInfo

    overrides = [
        arg for k, v in run_overrides(CONFIGS["tied"], tiny_dataset) for arg in (f"--{k}", v)
    ]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "pretrain.train", "--out", str(tmp_path / "fsdp"), *overrides],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).parents[1],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "world size 2" in done.stdout
    step_dir = resolve_checkpoint(tmp_path / "fsdp")
    assert len(list(step_dir.glob("*.distcp"))) == 2

    model = reference_model(step_dir)
    single = Checkpointer(
        tmp_path / "single",
        dist_info=DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")),
        config=Config(model=model.config),
        tokenizer_path=tiny_dataset / "tokenizer.json",
    )
    optimizer = torch.optim.AdamW(model.parameters())
    single.save(3, model, optimizer, {"step": 3, "loader": {}})
    assert export_cli(tmp_path / "fsdp", "--out", tmp_path / "from-2-ranks") == 0
    assert export_cli(tmp_path / "single", "--out", tmp_path / "from-1-rank") == 0
    for file in ("checksums.sha256", "model.safetensors", "config.json"):
        assert (tmp_path / "from-2-ranks" / file).read_bytes() == (
            tmp_path / "from-1-rank" / file
        ).read_bytes()
    cfg, weights, _ = load_export(tmp_path / "from-2-ranks")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=0)


def test_damaged_export_is_refused_by_name(exports, tmp_path):
    import shutil

    _, export_dir = exports["tied"]
    damaged = tmp_path / "damaged"
    shutil.copytree(export_dir, damaged)
    weights = damaged / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    for load in (load_export, load_model):
        with pytest.raises(UserError, match=r"model\.safetensors fails its checksum"):
            load(damaged)

    weights.write_bytes(bytes(data[: len(data) // 3]))  # truncated
    with pytest.raises(UserError, match=r"model\.safetensors fails its checksum"):
        verify_export(damaged)
    with pytest.raises(UserError, match=r"model\.safetensors is damaged"):
        load_export(damaged, verify=False)

    (damaged / "tokenizer_config.json").unlink()
    with pytest.raises(
        UserError,
        match=r"model\.safetensors fails its checksum.*; tokenizer_config\.json is missing",
    ):
        verify_export(damaged)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.pop("num_key_value_heads"), "'num_key_value_heads' is missing"),
        (lambda c: c.update(head_dim=8), "'head_dim' is 8"),
        (lambda c: c.update(hidden_act="gelu"), "'hidden_act' is 'gelu'"),
        (lambda c: c.update(num_key_value_heads=3), "n_heads=4 is not divisible"),
        (lambda c: c.update(vocab_size="320"), "'vocab_size' has the wrong type"),
        (lambda c: c.update(intermediate_size=100), r"mlp\.gate_proj\.weight .*has shape"),
    ],
)
def test_bad_config_json_names_the_field(edit, message, exports, tmp_path):
    import shutil

    _, export_dir = exports["gqa"]
    bad = tmp_path / "bad"
    shutil.copytree(export_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    edit(config)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message):
        load_export(bad, verify=False)
    with pytest.raises(UserError, match=r"config\.json fails its checksum"):
        load_export(bad)


def test_export_command_refuses_bad_paths(exports, tmp_path, capsys):
    import shutil

    _, export_dir = exports["mha"]
    run_dir = export_dir.parent / "run"
    (tmp_path / "empty").mkdir()
    assert export_cli(tmp_path / "empty", "--out", tmp_path / "x") == 2
    assert "is not a checkpoint" in capsys.readouterr().err
    assert export_cli(tmp_path / "missing", "--out", tmp_path / "x") == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    damaged = tmp_path / "damaged-run"
    shutil.copytree(run_dir, damaged)
    (shard,) = damaged.glob("checkpoints/step-*/*.distcp")
    shard.write_bytes(shard.read_bytes()[:100])
    assert export_cli(damaged, "--out", tmp_path / "x") == 2
    assert "could not be read (damaged or incomplete file?)" in capsys.readouterr().err
    (damaged / "checkpoints" / "latest").write_text("step-000009\n")
    assert export_cli(damaged, "--out", tmp_path / "x") == 2
    assert "not a complete checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert export_cli(run_dir, "--out", out) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert export_cli(run_dir, "--out", out, "--overwrite") == 2
    assert "is not an export" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"

    (out / "notes.txt").unlink()
    assert export_cli(run_dir, "--out", out, "--overwrite") == 0
    assert (
        export_cli(
            run_dir / "checkpoints" / "step-000003", "--out", out, "--overwrite", "--dtype", "fp16"
        )
        == 0
    )
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    verify_export(out)


def test_generate_command_prints_the_greedy_continuation(exports, tokenizer, capsys):
    model, export_dir = exports["gqa"]
    prompt = "Document 7. The model"
    args = ["generate", str(export_dir), "--prompt", prompt, "--max-tokens", "12"]
    assert cli.main([*args, "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    hf = hf_model(export_dir)
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    with torch.no_grad():
        expected = hf.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    expected = [t for t in expected.tolist() if t not in stop_token_ids(export_dir)]
    assert printed == tokenizer.decode(expected) + "\n"

    assert cli.main([*args, "--seed", "7", "--top-k", "50"]) == 0
    first = capsys.readouterr().out
    assert cli.main([*args, "--seed", "7", "--top-k", "50"]) == 0
    assert capsys.readouterr().out == first

    assert cli.main([*args, "--top-p", "0"]) == 2
    assert "--top-p must be in (0, 1]" in capsys.readouterr().err


def test_a_failed_export_leaves_the_previous_one_intact(exports, tmp_path, monkeypatch):
    import pretrain.export as export

    _, export_dir = exports["mha"]
    run_dir = export_dir.parent / "run"
    out = tmp_path / "export"
    assert export_cli(run_dir, "--out", out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_write_checksums", disk_full)
    with pytest.raises(OSError):
        export_cli(run_dir, "--out", out, "--overwrite", "--dtype", "bf16")
    with pytest.raises(OSError):
        export_cli(run_dir, "--out", tmp_path / "new")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
