"""A Qwen3 forward pass in plain torch, one decoder layer at a time.

The calibration of GPTQ/AWQ runs the model layer by layer: only the embeddings, one layer's
weights and the calibration activations are in memory, and each layer sees the outputs of the
already-quantized layers before it. This module is that forward, with the weights given as a
dict per layer (loaded from a ``Checkpoint``), so no transformers model is ever instantiated.
Tests check it against transformers' Qwen3 implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ggq.checkpoint import Checkpoint, HParams

# GGUF names of one layer's weights, as the layer dict keys (blk.{i}. stripped)
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
NORMS = ("attn_norm", "attn_q_norm", "attn_k_norm", "ffn_norm")


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
    """One decoder layer's weights as float32 tensors keyed by GGUF short name ("attn_q", ...)."""
    return {
        name: torch.from_numpy(ckpt.load(f"blk.{i}.{name}.weight")).to(device) for name in (*LINEARS, *NORMS)
    }


def attention_input(h: torch.Tensor, w: dict[str, torch.Tensor], hp: HParams) -> torch.Tensor:
    """The input of q/k/v: the normed residual stream. ``h``: (B, T, n_embd)."""
    return rms_norm(h, w["attn_norm"], hp.rms_eps)


def attention_core(x: torch.Tensor, w: dict[str, torch.Tensor], hp: HParams, rope: Rope) -> torch.Tensor:
    """q/k/v projections, QK-norm, RoPE, causal GQA attention; returns the input of o_proj (B, T, n_head*hd)."""
    B, T, _ = x.shape
    q = (x @ w["attn_q"].T).view(B, T, hp.n_head, hp.head_dim)  # (B, T, nh, hd)
    k = (x @ w["attn_k"].T).view(B, T, hp.n_head_kv, hp.head_dim)  # (B, T, nkv, hd)
    v = (x @ w["attn_v"].T).view(B, T, hp.n_head_kv, hp.head_dim)
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
    gate = torch.nn.functional.silu(x @ w["ffn_gate"].T, inplace=True)  # in place: one n_ff-wide copy less
    return gate.mul_(x @ w["ffn_up"].T)


def layer_forward(h: torch.Tensor, w: dict[str, torch.Tensor], hp: HParams, rope: Rope) -> torch.Tensor:
    """One decoder layer: (B, T, n_embd) -> (B, T, n_embd)."""
    h = h + attention_core(attention_input(h, w, hp), w, hp, rope) @ w["attn_output"].T
    return h + mlp_core(mlp_input(h, w, hp), w) @ w["ffn_down"].T


def embed(ckpt: Checkpoint, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) token ids -> (B, T, n_embd), reading only the embedding rows used."""
    flat = tokens.reshape(-1)
    unique, inverse = torch.unique(flat, return_inverse=True)
    rows = torch.stack(
        [torch.from_numpy(ckpt.load("token_embd.weight", int(t), int(t) + 1)[0]) for t in unique]
    )
    return rows[inverse].reshape(*tokens.shape, -1)
