"""LoRA fine-tuning: frozen base, trained adapters, small checkpoints, merged and PEFT exports.

References: the base model itself (adapters start at zero), the unmerged adapted model (the
merged export), Hugging Face PEFT on the transformers base (the PEFT export), an uninterrupted
run (resume) and one process (two torchrun ranks).
"""

from __future__ import annotations

import json
import shutil
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
from pretrain.checkpoint import find_checkpoint
from pretrain.config import (
    LORA_TARGETS,
    Config,
    ConfigError,
    LoRAConfig,
    config_to_toml,
    load_config,
)
from pretrain.errors import UserError
from pretrain.export import init_from, load_model
from pretrain.lora import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    LoRALinear,
    adapted_model,
    adapter_parameters,
    apply_lora,
    merge_lora,
    peft_names,
    read_adapters,
)
from pretrain.model import Transformer, fuse_projections
from pretrain.optim import build_optimizer

FAST = ["--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--eval.every", "0"]
LORA = ["--finetune.lora.rank", "2", "--finetune.lora.alpha", "8", "--train.lr", "1e-2"]
WITH_HEAD = [*LORA_TARGETS, "lm_head"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    tok = make_tokenizer(root / "tok" / "tokenizer.json")
    return {
        "root": root,
        "export": make_export(root / "base-export", tok, small_model_config(d_model=64)),
        "data": write_rows(root / "rows.jsonl", colour_rows(120)),
    }


def finetune(*argv) -> int:
    return cli.main(["finetune", *map(str, argv)])


def _args(base, steps: int = 4) -> list:
    return ["--init-from", base["export"], "--data", base["data"], "--train.steps", steps,
            *FAST, *LORA]  # fmt: skip


@pytest.fixture(scope="module")
def run(base) -> Path:
    """A LoRA fine-tuning run of 4 steps with checkpoints at steps 2 and 4."""
    out = base["root"] / "run"
    every = ["--checkpoint.every", "2", "--checkpoint.keep_last", "0"]
    assert finetune(*_args(base), *every, "--out", out) == 0
    return out


def _tokens(cfg, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(
        0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1)
    )


def _logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tokens).float()


# --------------------------------------------------------------------------- the adapters


def test_adapters_start_at_the_base_and_only_they_change():
    torch.manual_seed(0)
    cfg = small_model_config(d_model=64)
    model, tokens = Transformer(cfg), _tokens(cfg)
    before = _logits(model, tokens)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    torch.testing.assert_close(_logits(model, tokens), before, rtol=0, atol=0)
    n_sites = sum(isinstance(m, LoRALinear) for m in model.modules())
    assert n_sites == 7 * cfg.n_layers
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(
        adapter_parameters(model)
    )
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in adapter_parameters(model).items()}
    optimizer = build_optimizer(model, Config(), torch.device("cpu"))
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(tokens, tokens.roll(-1, 1)).backward()
        optimizer.step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert p.grad is None and torch.equal(p, frozen[name]), name
        else:
            assert not torch.equal(p, adapters[name]), name
    assert not torch.equal(_logits(model, tokens), before)


@pytest.mark.parametrize("targets", [list(LORA_TARGETS), WITH_HEAD], ids=["blocks", "with-head"])
def test_merged_model_equals_the_adapted_one_and_still_fuses(targets):
    torch.manual_seed(0)
    cfg = small_model_config(d_model=64, attention_bias=True)
    lora_cfg = LoRAConfig(rank=4, alpha=8.0, dropout=0.1, targets=targets)
    model = apply_lora(Transformer(cfg), lora_cfg)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.normal_(0, 0.05)
    tokens = _tokens(cfg)
    adapted = _logits(model, tokens)
    merged = merge_lora(model)
    assert all(type(m) is not LoRALinear for m in merged.modules())
    assert set(merged.state_dict()) == set(Transformer(cfg).state_dict())
    torch.testing.assert_close(_logits(merged, tokens), adapted, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        _logits(fuse_projections(merged), tokens), adapted, rtol=0, atol=1e-5
    )


def test_a_lora_head_trains_through_the_fused_loss():
    """The training loss (``linear_cross_entropy`` on the head's weight) sees the head's
    adapters: it equals cross-entropy of the adapted logits, and its gradient reaches them."""
    torch.manual_seed(0)
    cfg = small_model_config(d_model=64)
    model = apply_lora(Transformer(cfg), LoRAConfig(rank=4, alpha=8.0, targets=WITH_HEAD))
    head = model.lm_head
    assert isinstance(head, LoRALinear) and not head.weight.requires_grad
    with torch.no_grad():
        head.lora_B.weight.normal_(0, 0.5)
    tokens = _tokens(cfg)
    targets = tokens.roll(-1, 1)
    logits = model(tokens)
    reference = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss = model(tokens, targets)
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-5)
    loss.backward()
    assert head.lora_A.weight.grad.abs().max() > 0 and head.lora_B.weight.grad.abs().max() > 0
    assert head.weight.grad is None


def test_a_lora_head_on_a_tied_embedding_is_refused():
    model = Transformer(small_model_config(d_model=64, tie_embeddings=True))
    with pytest.raises(ConfigError, match="head is its embedding .* drop lm_head"):
        apply_lora(model, LoRAConfig(rank=4, targets=WITH_HEAD))


def test_peft_names_put_the_head_beside_the_model():
    names = peft_names({"layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(1),
                        "lm_head.lora_B.weight": torch.zeros(1)})  # fmt: skip
    assert sorted(names) == [
        "base_model.model.lm_head.lora_B.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    ]


def test_a_bf16_base_halves_the_frozen_weights_and_keeps_fp32_adapters():
    torch.manual_seed(0)
    cfg = small_model_config(d_model=64)
    model = Transformer(cfg)
    reference = _logits(model, _tokens(cfg))
    apply_lora(model, LoRAConfig(rank=4, base_dtype="bf16", targets=["q_proj", "down_proj"]))
    attn = model.layers[0].self_attn
    assert attn.q_proj.weight.dtype == torch.bfloat16 and attn.k_proj.weight.dtype == torch.float32
    assert attn.q_proj.lora_A.weight.dtype == torch.float32
    torch.testing.assert_close(_logits(model, _tokens(cfg)), reference, rtol=0, atol=0.05)


# --------------------------------------------------------------------------- config


def test_lora_keys_round_trip_through_toml(tmp_path):
    cfg = load_config(None, ["--finetune.lora.rank", "8", "--finetune.lora.targets", "q_proj,v_proj",
                             "--finetune.lora.base_dtype", "bf16", "--finetune.lora.dropout", "0.1"])  # fmt: skip
    text = config_to_toml(cfg)
    assert "[finetune.lora]\nrank = 8\n" in text
    (tmp_path / "c.toml").write_text(text)
    assert load_config(tmp_path / "c.toml") == cfg
    (tmp_path / "d.toml").write_text("[finetune.lora]\nrank = 4\nalpha = 32\n")
    assert load_config(tmp_path / "d.toml").finetune.lora == LoRAConfig(rank=4, alpha=32.0)


@pytest.mark.parametrize(
    "override, message",
    [
        (["--finetune.lora.rnak", "8"], "unknown config key 'finetune.lora.rnak'; did you mean 'finetune.lora.rank'?"),
        (["--finetune.lroa.rank", "8"], "unknown config section 'finetune.lroa' in 'finetune.lroa.rank'; did you mean 'finetune.lora.rank'?"),
        (["--finetune.lora", "8"], "'finetune.lora' is a section, not a key: set its keys, e.g. --finetune.lora.rank VALUE"),
        (["--finetune.lora.targets", "q_proj,qkv"], "finetune.lora.targets: unknown projection 'qkv'"),
        (["--finetune.lora.base_dtype", "fp8"], "finetune.lora.base_dtype must be one of fp32, bf16, got 'fp8'"),
    ],
)  # fmt: skip
def test_a_bad_lora_key_is_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_the_command_line_refuses_a_bad_lora_key_in_one_line(base, tmp_path, capsys):
    code = finetune(*_args(base), "--finetune.lora.rnak", "8", "--out", tmp_path / "r")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "did you mean 'finetune.lora.rank'" in err[0]


# --------------------------------------------------------------------------- runs


def test_the_checkpoint_holds_the_adapters_and_a_pointer_to_the_base(base, run):
    step = find_checkpoint(run)
    pointer = json.loads((step / "base.json").read_text())
    assert pointer["path"] == str(base["export"].resolve()) and len(pointer["identity"]) == 64
    _, adapters = read_adapters(step)
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)
    assert any(t.abs().max() > 0 for n, t in adapters.items() if ".lora_B." in n)  # trained
    stored = sum(f.stat().st_size for f in step.glob("*.distcp"))
    base_bytes = sum(f.stat().st_size for f in base["export"].glob("*.safetensors"))
    assert stored < base_bytes / 2  # adapters + their AdamW moments, against the base's weights


def test_merged_export_equals_the_unmerged_model(base, run, tmp_path):
    out = tmp_path / "merged"
    assert cli.main(["export", str(run), "--out", str(out)]) == 0
    merged = load_model(out)
    assert all(type(m) is not LoRALinear for m in merged.modules())
    unmerged = adapted_model(find_checkpoint(run), init_from)
    tokens = _tokens(small_model_config())
    torch.testing.assert_close(
        _logits(merged, tokens), _logits(unmerged, tokens), rtol=0, atol=1e-5
    )
    base_model = load_model(base["export"])
    assert not torch.allclose(_logits(base_model, tokens), _logits(merged, tokens), atol=1e-4)


def test_resume_gives_the_uninterrupted_adapters(base, run, tmp_path):
    """Resumed from step 2 of the fixture's run, the run ends on its step-4 adapters."""
    step2 = run / "checkpoints" / "step-000002"
    args = [*_args(base), "--checkpoint.resume", step2, "--out", tmp_path / "resumed"]
    assert finetune(*args) == 0
    _, whole = read_adapters(run / "checkpoints" / "step-000004")
    _, resumed = read_adapters(find_checkpoint(tmp_path / "resumed"))
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=0)


def test_a_changed_base_is_refused(run, tmp_path):
    step = tmp_path / "step-000004"
    shutil.copytree(find_checkpoint(run), step)
    pointer = json.loads((step / "base.json").read_text())
    (step / "base.json").write_text(json.dumps({**pointer, "identity": "0" * 64}))
    with pytest.raises(UserError, match="which has changed since"):
        adapted_model(step, init_from)


@pytest.mark.slow  # importing transformers and peft alone takes ~15 s on 2 cores
@pytest.mark.parametrize("head", [False, True], ids=["blocks", "with-head"])
def test_peft_loads_the_adapters_onto_the_transformers_base(base, run, tmp_path, head):
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    if head:  # a run of its own whose targets include the head
        targets = ["--finetune.lora.targets", ",".join(WITH_HEAD)]
        assert finetune(*_args(base, steps=2), *targets, "--out", tmp_path / "run-head") == 0
        run = tmp_path / "run-head"

    out = tmp_path / "adapter"
    assert cli.main(["export", str(run), "--out", str(out), "--lora-only"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([PEFT_CONFIG, PEFT_WEIGHTS])
    hf_base = LlamaForCausalLM.from_pretrained(base["export"], torch_dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(hf_base, out).eval()
    ours = adapted_model(find_checkpoint(run), init_from)
    tokens = _tokens(small_model_config())
    with torch.no_grad():
        theirs = model(tokens).logits.float()
    torch.testing.assert_close(theirs, _logits(ours, tokens), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- slow


@pytest.mark.slow
@pytest.mark.parametrize("head", [False, True], ids=["blocks", "with-head"])
def test_two_torchrun_ranks_match_one_process(base, run, tmp_path, head):
    """FSDP2 over 2 gloo ranks (frozen base and adapters in one unit per block, the head's in the
    root's): the adapters after 4 steps are the single process's within 1e-5."""
    import subprocess
    import sys

    from train_helpers import ROOT, env

    args = [*map(str, _args(base))]
    if head:
        args += ["--finetune.lora.targets", ",".join(WITH_HEAD)]
        assert finetune(*args, "--out", tmp_path / "w1") == 0
        one_dir = find_checkpoint(tmp_path / "w1")
    else:
        one_dir = run / "checkpoints" / "step-000004"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "pretrain.finetune", *args, "--out", str(tmp_path / "w2")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _, one = read_adapters(one_dir)
    _, two = read_adapters(find_checkpoint(tmp_path / "w2"))
    assert set(one) == set(two) and any(n.startswith("lm_head.") for n in one) == head
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_toy_task_is_learned_with_lora(tiny_dataset, tmp_path, root):
    """The full-fine-tuning toy test's base and rows, LoRA rank 8 with the head among the
    targets: on a base pretrained 30 steps the head is still near its initial weights, and
    adapters on the blocks alone cannot make its logits sharp (docs/finetuning.md)."""
    import sys

    sys.path.insert(0, str(root / "scripts"))
    import finetune_demo

    result = finetune_demo.main(
        [
            "--work", str(tmp_path / "demo"),
            "--data", str(tiny_dataset),
            "--pretrain-steps", "30",
            "--pretrain-set", "model.vocab_size=512",
            "--rows", "2000",
            "--eval-rows", "100",
            "--", "--finetune.lora.rank", "8", "--finetune.lora.alpha", "16",
            "--finetune.lora.targets", ",".join(WITH_HEAD), "--train.lr", "3e-3",
            "--train.global_batch_size", "4", "--train.micro_batch_size", "4",
            "--finetune.epochs", "3",
        ]
    )  # fmt: skip
    assert result["accuracy_before"] < 0.2
    assert result["accuracy_after"] >= 0.9
    assert result["served_accuracy_after"] >= 0.9
