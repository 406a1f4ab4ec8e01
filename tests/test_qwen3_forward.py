"""ggq's layer-by-layer Qwen3 forward (used by the calibration solvers) against transformers.

The solvers stop at the last layer; the final norm and output projection here complete the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ggq import qwen3
from ggq.checkpoint import Checkpoint


def logits(ckpt: Checkpoint, h: torch.Tensor) -> torch.Tensor:
    """Final norm and output projection (tied embeddings read token_embd)."""
    hp = ckpt.hparams
    h = qwen3.rms_norm(h, torch.from_numpy(ckpt.load("output_norm.weight")), hp.rms_eps)
    head = "token_embd.weight" if hp.tie_word_embeddings else "output.weight"
    return h @ torch.from_numpy(ckpt.load(head)).T


def forward(ckpt: Checkpoint, tokens: torch.Tensor) -> torch.Tensor:
    """The whole model, layer by layer: (B, T) -> logits (B, T, n_vocab)."""
    hp = ckpt.hparams
    rope = qwen3.Rope.build(hp, tokens.shape[1])
    h = qwen3.embed(ckpt, tokens)
    for i in range(hp.n_layer):
        h = qwen3.layer_forward(h, qwen3.load_layer(ckpt, i), hp, rope)
    return logits(ckpt, h)


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
    ours = forward(ckpt, tokens)
    ref = _reference(ckpt_dir, tokens)
    scale = float(ref.max() - ref.min())
    assert (ours - ref).abs().max().item() < 1e-4 * scale


def test_forward_equals_transformers_on_qwen3_micro(qwen3_micro: Path) -> None:
    ckpt = Checkpoint(qwen3_micro)
    tokens = torch.randint(0, 16000, (1, 96), generator=torch.Generator().manual_seed(1))
    ours = forward(ckpt, tokens)
    ref = _reference(qwen3_micro, tokens)
    assert (ours - ref).abs().max().item() < 1e-4 * float(ref.max() - ref.min())
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
