"""ggq's layer-by-layer Qwen3-MoE forward (ggq/qwen3.py: the router in float32, softmax, top-k,
renormalised weights, SwiGLU experts), which the calibration solvers run, against transformers'
Qwen3MoeForCausalLM: the whole model's logits and every layer's router logits and choices."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ggq import qwen3
from ggq.checkpoint import Checkpoint
from tests.test_qwen3_forward import logits

ROOT = Path(__file__).resolve().parent.parent
MOE_MICRO = ROOT / "models" / "qwen3-moe-micro"


def forward(
    ckpt: Checkpoint, tokens: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor], list[qwen3.Routing]]:
    """Logits (B, T, n_vocab), each layer's router logits (B*T, n_expert) and routing."""
    hp = ckpt.hparams
    rope = qwen3.Rope.build(hp, tokens.shape[1])
    h = qwen3.embed(ckpt, tokens)
    router_logits, routings = [], []
    for i in range(hp.n_layer):
        w = qwen3.load_layer(ckpt, i)
        a = h + qwen3.attention_core(qwen3.attention_input(h, w, hp), w, hp, rope) @ w["attn_output"].T
        x = qwen3.mlp_input(a, w, hp)
        router_logits.append(x.reshape(-1, hp.n_embd) @ w[qwen3.ROUTER].T)
        routings.append(qwen3.route(x, w, hp))
        h = qwen3.layer_forward(h, w, hp, rope)
    return logits(ckpt, h), router_logits, routings


def reference(ckpt_dir: Path, tokens: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32, attn_implementation="eager")
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    with torch.no_grad():
        out = model(tokens, output_router_logits=True)
    return out.logits, out.router_logits


def check(ckpt_dir: Path, tokens: torch.Tensor, tol: float) -> None:
    ckpt = Checkpoint(ckpt_dir)
    hp = ckpt.hparams
    with torch.no_grad():
        ours, router_logits, routings = forward(ckpt, tokens)
    ref, ref_router = reference(ckpt_dir, tokens)
    assert len(ref_router) == hp.n_layer
    for i, (mine, theirs) in enumerate(zip(router_logits, ref_router, strict=True)):
        assert (mine - theirs).abs().max().item() < tol * float(theirs.abs().max()), f"layer {i} router"
        probs = torch.softmax(theirs.float(), -1)
        top, idx = torch.topk(probs, hp.n_expert_used, -1)
        assert torch.equal(routings[i].experts, idx), f"layer {i}: other experts chosen"
        torch.testing.assert_close(routings[i].weights, top / top.sum(-1, keepdim=True), rtol=1e-4, atol=1e-6)
    assert (ours - ref).abs().max().item() < tol * float(ref.max() - ref.min())
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("variant", ["moe", "moe-4"])
def test_moe_forward_equals_transformers_on_fixtures(checkpoint, variant: str) -> None:
    ckpt_dir = checkpoint(variant)
    n_vocab = Checkpoint(ckpt_dir).hparams.n_vocab
    tokens = torch.randint(0, n_vocab, (2, 37), generator=torch.Generator().manual_seed(0))
    check(ckpt_dir, tokens, 1e-4)


def test_routing_counts_and_tokens_of_agree(checkpoint) -> None:
    """Each token goes to n_expert_used distinct experts; tokens_of(e) lists exactly e's rows."""
    ckpt = Checkpoint(checkpoint("moe-4"))
    hp = ckpt.hparams
    w = qwen3.load_layer(ckpt, 0)
    x = torch.randn(50, hp.n_embd, generator=torch.Generator().manual_seed(3))
    r = qwen3.route(x, w, hp)
    counts = r.counts(hp.n_expert)
    assert counts.sum() == 50 * hp.n_expert_used
    for e in range(hp.n_expert):
        rows, weight = r.tokens_of(e)
        assert len(rows) == counts[e] and torch.all(rows[1:] > rows[:-1])
        assert torch.all((r.experts[rows] == e).any(-1))
        assert torch.all(weight > 0)
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(50))


def test_moe_forward_equals_transformers_on_qwen3_moe_micro() -> None:
    if not (MOE_MICRO / "model.safetensors").is_file():
        pytest.skip(f"reference model not found at {MOE_MICRO}")
    tokens = torch.randint(0, 16000, (1, 96), generator=torch.Generator().manual_seed(1))
    check(MOE_MICRO, tokens, 1e-4)
