"""Hugging Face families: Llama, Mistral, Qwen2 and Qwen3 checkpoints in, the same families out.

The reference is transformers itself: a tiny model of each family with random weights, saved
with ``save_pretrained``, must give our model the same logits (fp32, 1e-4) and the same greedy
tokens; what we export must load in transformers as the same architecture with our logits.
The architecture options (QK-norm, q/k/v biases, an explicit head width, scaled RoPE) are
checked against the transformers module that has them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from finetune_helpers import colour_rows, make_tokenizer, write_rows

from pretrain import cli
from pretrain.config import ConfigError, ModelConfig
from pretrain.errors import UserError
from pretrain.export import load_model, save_export
from pretrain.generate import generate
from pretrain.hf import model_config_from_hf
from pretrain.model import Transformer, fuse_projections

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

VOCAB = 400  # the size of finetune_helpers' tokenizer
TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: more threads only add synchronisation on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_tokens(n: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def ours_from_transformers(hf_model, cfg: ModelConfig) -> Transformer:
    """Our model holding a transformers model's weights, renamed by hand (no adapter code)."""
    model = Transformer(cfg)
    weights = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model.eval()


def max_logit_diff(ours: Transformer, hf_model, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        want = hf_model(tokens).logits.float()
        got = ours(tokens)
    return (got - want).abs().max().item()


@pytest.fixture(scope="module")
def qwen3_module():
    """A transformers Qwen3 (QK-norm, head_dim != hidden / heads) and the config matching it."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    hf_cfg = Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=128,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
    )  # fmt: skip
    hf_model = Qwen3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # norm gains away from 1, so a missing norm cannot pass
        for name, p in hf_model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    cfg = ModelConfig(
        vocab_size=VOCAB, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96,
        max_seq_len=128, norm_eps=1e-6, qk_norm=True, head_dim_override=24,
    )  # fmt: skip
    return hf_model, cfg


def test_qk_norm_and_head_dim_match_qwen3_attention(qwen3_module):
    hf_model, cfg = qwen3_module
    ours = ours_from_transformers(hf_model, cfg)
    assert ours.layers[0].self_attn.q_norm.weight.shape == (24,)
    assert max_logit_diff(ours, hf_model, random_tokens()) <= TOL
    without = ModelConfig(**{**cfg.__dict__, "qk_norm": False})
    stripped = Transformer(without)
    stripped.load_state_dict(
        {k: v for k, v in ours.state_dict().items() if "_norm.weight" not in k or "layernorm" in k}
    )
    assert max_logit_diff(stripped.eval(), hf_model, random_tokens()) > 1e-2  # the op matters
    fuse_projections(ours)
    assert max_logit_diff(ours, hf_model, random_tokens()) <= TOL


def test_architecture_options_are_validated_in_one_line():
    for overrides, named in [
        ({"head_dim_override": -1}, "model.head_dim_override"),
        ({"head_dim_override": 7}, "head dim 7"),
        ({"rope_factor": 2.0}, "model.rope_factor"),
        ({"rope_scaling": "llama3", "rope_factor": 8.0}, "model.rope_original_max_seq_len"),
        ({"rope_scaling": "linear", "rope_factor": 0.5}, "model.rope_factor"),
        (
            {"rope_scaling": "llama3", "rope_factor": 8.0, "rope_original_max_seq_len": 64,
             "rope_low_freq_factor": 4.0, "rope_high_freq_factor": 1.0},
            "rope_low_freq_factor",
        ),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=named):
            ModelConfig(**overrides).validate()
    ModelConfig(d_model=60, n_heads=8, head_dim_override=16).validate()  # need not divide


# --------------------------------------------------------------------------- the families

SHAPE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
    bos_token_id=0, eos_token_id=0, initializer_range=0.1,
)  # fmt: skip
LLAMA3 = {
    "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
}  # fmt: skip
YARN = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
        "original_max_position_embeddings": 32}  # fmt: skip
FAMILIES = {  # name: (transformers class name, config fields beyond SHAPE)
    "llama": ("Llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}),
    "llama-linear": (
        "Llama",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
    ),
    "llama3": ("Llama", {"rope_parameters": LLAMA3, "tie_word_embeddings": True}),
    "mistral": ("Mistral", {"sliding_window": None, "head_dim": 32}),
    "qwen2": ("Qwen2", {}),
    "qwen3": ("Qwen3", {"head_dim": 24}),
    "qwen3-yarn": ("Qwen3", {"head_dim": 24, "rope_parameters": YARN}),
}
LONG = ("llama3", "qwen3-yarn")  # scaled RoPE: checked beyond the original context
DEFAULT_SUITE = ("llama3", "qwen2", "qwen3", "qwen3-yarn")  # the rest: slow cases


def family_params(names=FAMILIES, default=DEFAULT_SUITE):
    return [pytest.param(n, marks=() if n in default else pytest.mark.slow) for n in names]


def make_hf_model(name: str):
    """A tiny transformers model of the family, with random norm gains and biases (a missing
    norm or bias cannot pass), seeded per family."""
    import transformers

    prefix, extra = FAMILIES[name]
    config = getattr(transformers, f"{prefix}Config")(**SHAPE, **extra)
    torch.manual_seed(len(name))
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif pname.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model


def as_transformers_4(config: dict) -> dict:
    """The same config as transformers 4.x wrote it: rope_theta and rope_scaling at the top
    (with the old ``type`` key for linear), torch_dtype for dtype."""
    config = dict(config)
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    if kind != "default":
        config["rope_scaling"] = {"type" if kind == "linear" else "rope_type": kind, **rope}
    config["torch_dtype"] = config.pop("dtype", None) or "float32"
    config["transformers_version"] = "4.46.0"
    return config


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("hf-tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, tokenizer_path):
    """``get(family, style)``: the family's model and its directory saved by transformers 5
    (``"5"``) or rewritten as transformers 4 wrote it (``"4"``); each made once."""
    base = tmp_path_factory.mktemp("hf-families")
    made: dict = {}

    def get(name: str, style: str = "5"):
        if name not in made:
            model = make_hf_model(name)
            out = base / f"{name}-5"
            model.save_pretrained(out)
            shutil.copy(tokenizer_path, out / "tokenizer.json")
            old = base / f"{name}-4"
            shutil.copytree(out, old)
            config = json.loads((old / "config.json").read_text())
            (old / "config.json").write_text(json.dumps(as_transformers_4(config), indent=2))
            made[name] = (model, {"5": out, "4": old})
        model, dirs = made[name]
        return model, dirs[style]

    return get


@torch.no_grad()
def transformers_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=None, bos_token_id=None
    )
    out = hf_model.generate(torch.tensor([prompt]), generation_config=config)
    return out[0, len(prompt) :].tolist()


def quiet_load(path: Path, **kw) -> Transformer:
    with contextlib.redirect_stderr(io.StringIO()):
        return load_model(path, **kw)


@pytest.mark.parametrize("style", ["5", "4"])
@pytest.mark.parametrize("name", family_params())
def test_a_transformers_checkpoint_gives_our_model_its_logits_and_greedy_tokens(
    hf_dirs, name, style
):
    hf_model, path = hf_dirs(name, style)
    ours = quiet_load(path)
    assert ours.config.hf_family == ("mistral" if name == "mistral" else "auto")
    tokens = random_tokens(2, 100 if name in LONG else 24)  # beyond 32 positions
    assert max_logit_diff(ours, hf_model, tokens) <= TOL
    if style == "4":
        return  # the same weights: the greedy tokens are the transformers 5 case's
    prompt = random_tokens(1, 5, seed=1)[0].tolist()
    assert generate(ours, prompt, max_tokens=32) == transformers_greedy(hf_model, prompt, 32)


def test_llama3_scaling_matters_beyond_the_original_context(hf_dirs):
    hf_model, path = hf_dirs("llama3")
    ours = quiet_load(path)
    plain = Transformer(ModelConfig(**{**ours.config.__dict__, "rope_scaling": "none",
                                       "rope_factor": 1.0}))  # fmt: skip
    plain.load_state_dict(ours.state_dict())
    tokens = random_tokens(1, 100)
    with torch.no_grad():
        want = hf_model(tokens).logits
        scaled, unscaled = ours(tokens), plain.eval()(tokens)
    assert (scaled - want).abs().max() <= TOL
    assert (unscaled - want)[:, 40:].abs().max() > 1e-2  # far positions need the scaling


@pytest.mark.parametrize("name", family_params())
def test_an_export_loads_in_transformers_as_the_same_family_with_our_logits(
    hf_dirs, name, tmp_path
):
    from transformers import AutoModelForCausalLM

    hf_model, path = hf_dirs(name, "4")
    ours = quiet_load(path)
    out = save_export(ours, path / "tokenizer.json", tmp_path / "export")
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back).__name__ == type(hf_model).__name__
    assert back.config.model_type == hf_model.config.model_type
    tokens = random_tokens(2, 100 if name in LONG else 24)
    assert max_logit_diff(ours, back, tokens) <= TOL
    assert load_model(out).config == ours.config  # and back to us: checksums verified


NATIVE = {  # options of a model trained here -> the class transformers loads its export as
    "Qwen3ForCausalLM": dict(qk_norm=True, head_dim_override=24),
    "Qwen2ForCausalLM": dict(attention_bias=True),
    "LlamaForCausalLM": dict(head_dim_override=8, rope_scaling="linear", rope_factor=4.0),
}


@pytest.mark.parametrize("arch", list(NATIVE))
def test_a_model_trained_here_exports_as_the_family_its_options_need(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(vocab_size=VOCAB, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                      max_seq_len=64, init_std=0.1, **NATIVE[arch])  # fmt: skip
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    with torch.no_grad():  # gains and biases away from their initial values
        for p in ours.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    out = save_export(ours, make_tokenizer(tmp_path / "tok.json"), tmp_path / "export")
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back).__name__ == arch
    assert max_logit_diff(ours, back, random_tokens(2, 60)) <= TOL


def test_sharded_bf16_checkpoint_with_an_index(hf_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_model, _ = hf_dirs("qwen3")
    out = tmp_path / "sharded"
    hf_model.to(torch.bfloat16).save_pretrained(out, max_shard_size="60KB")
    hf_model.float()
    shutil.copy(hf_dirs("qwen3")[1] / "tokenizer.json", out)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert next(quiet_load(out).parameters()).dtype == torch.bfloat16
    ours = quiet_load(out, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert max_logit_diff(ours, reference, random_tokens()) <= TOL


def test_a_directory_without_tokenizer_is_a_clear_error(hf_dirs, tmp_path):
    _, path = hf_dirs("qwen3")
    bare = tmp_path / "bare"
    shutil.copytree(path, bare)
    (bare / "tokenizer.json").unlink()
    with pytest.raises(UserError, match=r"bare has no tokenizer\.json"):
        quiet_load(bare)
    from pretrain.finetune import read_init

    with pytest.raises(UserError, match=r"bare has no tokenizer\.json"):
        read_init(bare)


# --------------------------------------------------------------------------- refusals


def _edit(config: dict, **changes) -> dict:
    return {**config, **changes}


REFUSED = {  # family: [(config change, the field named)]
    "llama": [
        (dict(attention_bias=True), "attention_bias"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
        (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
         "rope_parameters.rope_type"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                               "partial_rotary_factor": 0.5}),
         "rope_parameters.partial_rotary_factor"),
        (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}),
         "rope_parameters.factor"),
        (dict(rope_parameters=None), "rope_theta"),
        (dict(rope_theta=1.0), "rope_theta"),
        (dict(attention_dropout=0.1), "attention_dropout"),
        (dict(quantization_config={"quant_method": "bitsandbytes"}), "quantization_config"),
        (dict(architectures=["MistralForCausalLM"]), "model_type"),
        (dict(architectures=["GemmaForCausalLM"]), "architectures"),
    ],
    "mistral": [(dict(sliding_window=64), "sliding_window")],
    "qwen2": [
        (dict(use_sliding_window=True, sliding_window=64, max_window_layers=0, layer_types=None),
         "use_sliding_window"),
        (dict(layer_types=["full_attention", "sliding_attention"], sliding_window=64,
              use_sliding_window=True),
         "use_sliding_window"),
    ],
    "qwen3": [
        (dict(attention_bias=True), "attention_bias"),
        (dict(rope_parameters={**YARN, "mscale": 0.7, "mscale_all_dim": 0.7}),
         "rope_parameters.mscale"),
        (dict(rope_parameters={**YARN, "truncate": 1}), "rope_parameters.truncate"),
    ],
}  # fmt: skip


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_field_we_do_not_implement_is_refused_by_its_name(hf_dirs, name):
    _, path = hf_dirs(name)
    config = json.loads((path / "config.json").read_text())
    model_config_from_hf(config)  # as saved: accepted
    for change, field in REFUSED[name]:
        with pytest.raises(UserError, match=f"field '{field}'"):
            model_config_from_hf(_edit(config, **change))
    if name == "mistral":  # a window as long as the context is full attention
        model_config_from_hf(_edit(config, sliding_window=128))


def test_an_option_without_a_transformers_architecture_is_refused_by_export(tmp_path):
    cfg = ModelConfig(vocab_size=VOCAB, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1,
                      qk_norm=True, attention_bias=True)  # fmt: skip
    with pytest.raises(UserError, match=r"^model\.qk_norm with model\.attention_bias has no"):
        save_export(Transformer(cfg), make_tokenizer(tmp_path / "t.json"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    plain = ModelConfig(**{**cfg.__dict__, "qk_norm": False, "attention_bias": False,
                           "hf_family": "qwen3"})  # fmt: skip
    with pytest.raises(UserError, match=r"model\.hf_family='qwen3' needs model\.qk_norm"):
        save_export(Transformer(plain), tmp_path / "t.json", tmp_path / "out")


# --------------------------------------------------------------------------- fine-tune, generate, serve


@pytest.mark.parametrize("name", family_params(default=("qwen3",)))
def test_fine_tuned_from_a_transformers_checkpoint_and_exported_as_the_same_family(
    hf_dirs, name, tmp_path
):
    from transformers import AutoModelForCausalLM

    hf_model, path = hf_dirs(name)
    rows = write_rows(tmp_path / "rows.jsonl", colour_rows(48))
    run, out = tmp_path / "run", tmp_path / "export"
    args = ["--init-from", path, "--data", rows, "--out", run, "--train.steps", "20",
            "--train.global_batch_size", "4", "--train.micro_batch_size", "4",
            "--data.seq_len", "64", "--eval.every", "0", "--logging.every", "100"]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(["finetune", *map(str, args)]) == 0
        assert cli.main(["export", str(run), "--out", str(out)]) == 0
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back).__name__ == type(hf_model).__name__
    tuned = load_model(out)
    assert max_logit_diff(tuned, back, random_tokens()) <= TOL
    assert max_logit_diff(tuned, hf_model, random_tokens()) > 1e-3  # 20 steps moved the weights


@pytest.mark.slow
def test_continued_pretraining_starts_from_a_transformers_checkpoint(tiny_dataset, tmp_path):
    """``pretrain train --checkpoint.init_from HF_DIR``: step 0's weights are the directory's."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from pretrain.checkpoint import read_model_weights
    from pretrain.export import resolve_checkpoint

    torch.manual_seed(0)
    shape = {**SHAPE, "vocab_size": 512, "head_dim": 24}
    hf_model = Qwen3ForCausalLM(Qwen3Config(**shape)).eval()
    path = tmp_path / "qwen3"
    hf_model.save_pretrained(path)
    shutil.copy(tiny_dataset / "tokenizer.json", path)
    model_keys = {"vocab_size": 512, "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2,
                  "ffn_hidden": 96, "max_seq_len": 128, "norm_eps": 1e-6, "qk_norm": "true",
                  "head_dim_override": 24}  # fmt: skip
    args = ["train", "--data", str(tiny_dataset), "--out", str(tmp_path / "run"),
            "--checkpoint.init_from", str(path), "--train.steps", "2", "--train.lr", "1e-9",
            "--train.warmup_steps", "0", "--train.global_batch_size", "2",
            "--train.micro_batch_size", "2", "--data.seq_len", "32", "--eval.every", "0",
            "--train.device", "cpu"]  # fmt: skip
    args += [a for k, v in model_keys.items() for a in (f"--model.{k}", str(v))]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(args) == 0
    _, weights = read_model_weights(resolve_checkpoint(tmp_path / "run"))
    start = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    for name, tensor in start.items():  # a learning rate of 1e-9: still the init's weights
        torch.testing.assert_close(weights[name], tensor, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["qwen3", "qwen2"])
def test_the_server_engine_decodes_qk_norm_and_biases_as_generate_does(hf_dirs, name):
    from pretrain.inference import load_for_inference
    from pretrain.serve.engine import Engine, SamplingParams

    _, path = hf_dirs(name)
    with contextlib.redirect_stderr(io.StringIO()):
        loaded = load_for_inference(path, device="cpu")
    prompt = random_tokens(1, 7, seed=3)[0].tolist()
    want = generate(loaded.model, prompt, max_tokens=24)
    engine = Engine(loaded.model, loaded.tokenizer, eos_ids=[], max_batch=4, prefill_chunk=4)
    assert engine.model.layers[0].self_attn.qkv_proj is not None  # the fused path, biases too
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    assert engine.generate(prompt, params) == want


PROMPT = "the quick brown fox"


def _cli_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3", "qwen2"])
def test_pretrain_generate_and_pretrain_serve_give_the_same_greedy_text(hf_dirs, name):
    import subprocess

    import httpx
    from serve_helpers import ServerProcess

    _, path = hf_dirs(name)
    cmd = [sys.executable, "-m", "pretrain.cli", "generate", str(path), "--prompt", PROMPT,
           "--max-tokens", "24", "--temperature", "0", "--device", "cpu"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_cli_env())
    assert done.returncode == 0, done.stderr
    assert "read unverified" in done.stderr  # a foreign directory, said so
    generated = done.stdout.removesuffix("\n")
    server = ServerProcess(path)
    try:
        server.wait_ready(timeout=180)
        body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0}
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == generated
    finally:
        server.stop()
