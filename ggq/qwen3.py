"""A Qwen3 forward pass in plain torch, one decoder layer at a time.

The calibration of GPTQ/AWQ runs the model layer by layer: only the embeddings, one layer's
weights and the calibration activations are in memory, and each layer sees the outputs of the
already-quantized layers before it. This module is that forward, with the weights given as a
dict per layer (loaded from a ``Checkpoint``), so no transformers model is ever instantiated.
Tests check it against transformers' Qwen3 implementation.

Qwen3-MoE layers (``ffn_gate_inp`` in the layer dict) replace the SwiGLU MLP by a router and
``n_expert`` SwiGLU experts, as llama.cpp's ``qwen3moe`` graph computes them: router logits in
float32, softmax over all experts, the top ``n_expert_used`` probabilities, renormalised to sum
to 1 (Qwen3-MoE always sets ``norm_topk_prob``; the checkpoint reader refuses it off), and the
layer's output the routing-weighted sum of the chosen experts' outputs. The experts are the
merged 3-D tensors of the GGUF file, (n_expert, rows, cols) in torch layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ggq.checkpoint import Checkpoint, HParams
from ggq.solvers.reductions import mm

# GGUF names of one layer's weights, as the layer dict keys (blk.{i}. stripped)
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
NORMS = ("attn_norm", "attn_q_norm", "attn_k_norm", "ffn_norm")
# a Qwen3-MoE layer: the attention LINEARS, the router (kept in float32) and the merged experts
ATTN_LINEARS = LINEARS[:4]
ROUTER = "ffn_gate_inp"
EXPERTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
MOE_LINEARS = (*ATTN_LINEARS, *EXPERTS)


@dataclass(frozen=True)
class Rope:
    cos: torch.Tensor  # (T, head_dim)
    sin: torch.Tensor  # (T, head_dim)

    @classmethod
    def build(cls, hp: HParams, n_tokens: int, device: torch.device | str = "cpu") -> Rope:
        inv = 1.0 / (
            hp.rope_theta
            ** (torch.arange(0, hp.head_dim, 2, dtype=torch.float32, device=device) / hp.head_dim)
        )
        pos = torch.arange(n_tokens, dtype=torch.float32, device=device)
        freqs = torch.outer(pos, inv)  # (T, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, head_dim): NEOX layout, halves rotated together
        return cls(emb.cos(), emb.sin())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    var = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(var + eps))


def _rotate(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * rope.cos + rotated * rope.sin


def load_layer(ckpt: Checkpoint, i: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """One decoder layer's weights as float32 tensors keyed by GGUF short name ("attn_q", ...);
    of a Qwen3-MoE layer the router and the merged experts, (n_expert, rows, cols)."""
    names = (*MOE_LINEARS, ROUTER, *NORMS) if ckpt.hparams.n_expert else (*LINEARS, *NORMS)
    return {name: torch.from_numpy(ckpt.load(f"blk.{i}.{name}.weight")).to(device) for name in names}


def attention_input(h: torch.Tensor, w: dict[str, torch.Tensor], hp: HParams) -> torch.Tensor:
    """The input of q/k/v: the normed residual stream. ``h``: (B, T, n_embd)."""
    return rms_norm(h, w["attn_norm"], hp.rms_eps)


def attention_core(x: torch.Tensor, w: dict[str, torch.Tensor], hp: HParams, rope: Rope) -> torch.Tensor:
    """q/k/v projections, QK-norm, RoPE, causal GQA attention; returns the input of o_proj (B, T, n_head*hd)."""
    B, T, _ = x.shape
    q = mm(x, w["attn_q"].T).view(B, T, hp.n_head, hp.head_dim)  # (B, T, nh, hd)
    k = mm(x, w["attn_k"].T).view(B, T, hp.n_head_kv, hp.head_dim)  # (B, T, nkv, hd)
    v = mm(x, w["attn_v"].T).view(B, T, hp.n_head_kv, hp.head_dim)
    q = rms_norm(q, w["attn_q_norm"], hp.rms_eps).transpose(1, 2)  # (B, nh, T, hd)
    k = rms_norm(k, w["attn_k_norm"], hp.rms_eps).transpose(1, 2)  # (B, nkv, T, hd)
    v = v.transpose(1, 2)
    q, k = _rotate(q, rope), _rotate(k, rope)
    group = hp.n_head // hp.n_head_kv
    k = k.repeat_interleave(group, dim=1)  # (B, nh, T, hd): each KV head serves `group` query heads
    v = v.repeat_interleave(group, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
    return out.transpose(1, 2).reshape(B, T, hp.n_head * hp.head_dim)


def mlp_input(h: torch.Tensor, w: dict[str, torch.Tensor], hp: HParams) -> torch.Tensor:
    return rms_norm(h, w["ffn_norm"], hp.rms_eps)


def mlp_core(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """SwiGLU up to the input of down_proj: (B, T, n_ff)."""
    gate = torch.nn.functional.silu(mm(x, w["ffn_gate"].T), inplace=True)  # in place: one n_ff-wide copy less
    return gate.mul_(mm(x, w["ffn_up"].T))


@dataclass(frozen=True)
class Routing:
    """Where a Qwen3-MoE layer sends each token of its (N, n_embd) input."""

    experts: torch.Tensor  # (N, n_expert_used) int64, the chosen experts, most probable first
    weights: torch.Tensor  # (N, n_expert_used) float32, their renormalised probabilities

    def tokens_of(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows routed to expert ``e`` (ascending) and each one's routing weight."""
        rows, slot = torch.where(self.experts == e)  # row-major: rows ascending
        return rows, self.weights[rows, slot]

    def counts(self, n_expert: int) -> np.ndarray:
        """(n_expert,) tokens routed to each expert."""
        return np.bincount(self.experts.reshape(-1).cpu().numpy(), minlength=n_expert)


def route(x: torch.Tensor, w: dict[str, torch.Tensor], hp: HParams) -> Routing:
    """The router on ``x`` (..., n_embd), the MLP input: float32 logits, softmax, top-k, renormalised."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.float32)
    probs = torch.softmax(flat @ w[ROUTER].to(torch.float32).T, dim=-1)  # (N, n_expert)
    top, idx = torch.topk(probs, hp.n_expert_used, dim=-1)  # (N, k)
    return Routing(idx, top / top.sum(-1, keepdim=True))


def expert_core(x: torch.Tensor, w: dict[str, torch.Tensor], e: int) -> torch.Tensor:
    """Expert ``e``'s SwiGLU up to the input of its down projection: (N, n_embd) -> (N, n_ff_exp)."""
    gate = torch.nn.functional.silu(mm(x, w["ffn_gate_exps"][e].T), inplace=True)
    return gate.mul_(mm(x, w["ffn_up_exps"][e].T))


def moe_core(
    x: torch.Tensor, w: dict[str, torch.Tensor], hp: HParams, routing: Routing | None = None
) -> torch.Tensor:
    """The experts' routing-weighted sum: (..., n_embd) MLP input -> (..., n_embd) MLP output."""
    flat = x.reshape(-1, x.shape[-1])
    r = route(flat, w, hp) if routing is None else routing
    out = torch.zeros_like(flat)
    for e in range(hp.n_expert):
        rows, weight = r.tokens_of(e)
        if rows.numel():
            y = mm(expert_core(flat[rows], w, e), w["ffn_down_exps"][e].T)  # (n_e, n_embd)
            out.index_add_(0, rows, y * weight[:, None])
    return out.reshape(x.shape)


def layer_forward(h: torch.Tensor, w: dict[str, torch.Tensor], hp: HParams, rope: Rope) -> torch.Tensor:
    """One decoder layer: (B, T, n_embd) -> (B, T, n_embd)."""
    h = h + mm(attention_core(attention_input(h, w, hp), w, hp, rope), w["attn_output"].T)
    if ROUTER in w:
        return h + moe_core(mlp_input(h, w, hp), w, hp)
    return h + mm(mlp_core(mlp_input(h, w, hp), w), w["ffn_down"].T)


def embed(ckpt: Checkpoint, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) token ids -> (B, T, n_embd), reading only the embedding rows used."""
    flat = tokens.reshape(-1)
    unique, inverse = torch.unique(flat, return_inverse=True)
    rows = torch.stack(
        [torch.from_numpy(ckpt.load("token_embd.weight", int(t), int(t) + 1)[0]) for t in unique]
    )
    return rows[inverse].reshape(*tokens.shape, -1)
