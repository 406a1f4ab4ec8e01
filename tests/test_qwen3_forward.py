"""ggq's layer-by-layer Qwen3 forward (used by the calibration solvers) against transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ggq import qwen3
from ggq.checkpoint import Checkpoint


def _reference(ckpt_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("variant", ["tied", "untied", "odd-head-dim", "sharded"])
def test_forward_equals_transformers_on_fixtures(checkpoint, variant: str) -> None:
    ckpt_dir = checkpoint(variant)
    ckpt = Checkpoint(ckpt_dir)
    tokens = torch.randint(0, ckpt.hparams.n_vocab, (2, 37), generator=torch.Generator().manual_seed(0))
    ours = qwen3.forward(ckpt, tokens)
    ref = _reference(ckpt_dir, tokens)
    scale = float(ref.max() - ref.min())
    assert (ours - ref).abs().max().item() < 1e-4 * scale


def test_forward_equals_transformers_on_qwen3_micro(qwen3_micro: Path) -> None:
    ckpt = Checkpoint(qwen3_micro)
    tokens = torch.randint(0, 16000, (1, 96), generator=torch.Generator().manual_seed(1))
    ours = qwen3.forward(ckpt, tokens)
    ref = _reference(qwen3_micro, tokens)
    assert (ours - ref).abs().max().item() < 1e-4 * float(ref.max() - ref.min())
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
