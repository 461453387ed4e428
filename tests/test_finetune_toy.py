"""Fine-tuning teaches a briefly pretrained tiny model a rule it did not know (slow, CPU).

scripts/finetune_demo.py runs the whole pipeline through the command line: pretrain the tiny
model on the ``tiny_dataset`` corpus, ask held-out prompts, fine-tune on generated
prompt -> answer rows, ask again through ``pretrain generate`` and ``pretrain serve``.
"""

from __future__ import annotations

import sys

import pytest


@pytest.mark.slow
def test_toy_task_is_learned(tiny_dataset, tmp_path, root):
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
        ]
    )  # fmt: skip
    assert result["accuracy_before"] < 0.2
    assert result["served_accuracy_before"] < 0.2
    assert result["accuracy_after"] >= 0.9
    assert result["served_accuracy_after"] >= 0.9
