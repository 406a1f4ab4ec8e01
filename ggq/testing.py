"""Tiny Qwen3 checkpoints in Hugging Face format, for tests, tools and the demo.

Weights are random but seeded (dense Qwen3, or Qwen3-MoE with one tensor per expert as the hub
ships them: ``Qwen3MoeSpec``); the tokenizer is the real Qwen2/Qwen3 byte-level BPE, built from
llama.cpp's ``ggml-vocab-qwen2.gguf`` (151,643 BPE tokens, 151,387 merges, in rank order). A
fixture with a smaller vocabulary keeps the first ranks and the merges among them, as
qwen3-micro does, and places the Qwen special tokens right after them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN3_VOCAB_ROWS = 151936  # embedding rows of every Qwen3 dense release
QWEN2_BPE_TOKENS = 151643

# Added tokens in the order Qwen3 numbers them after the BPE ranks; False = not "special"
# (they are plain text in tool calls and thinking blocks, llama.cpp types them user-defined).
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", True),
    ("<|fim_middle|>", True),
    ("<|fim_suffix|>", True),
    ("<|fim_pad|>", True),
    ("<|repo_name|>", True),
    ("<|file_sep|>", True),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

# A ChatML template with Qwen3's thinking switch, written for ggq (not copied from a release):
# `enable_thinking=False` closes an empty think block so the model answers directly.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and '</think>' in message['content'] %}"
    "{%- set content = message['content'].split('</think>')[-1].lstrip('\\n') %}"
    "{%- else %}{%- set content = message['content'] %}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


@dataclass(frozen=True)
class Qwen3Spec:
    """Shape of a fixture checkpoint; the defaults give a tied, GQA model of ~0.2M parameters."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    vocab_size: int = 1024
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 4096
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    seed: int = 0
    shards: int = 1


@dataclass(frozen=True)
class Qwen3MoeSpec(Qwen3Spec):
    """A Qwen3-MoE fixture: every layer a router and ``num_experts`` SwiGLU experts (hub layout:
    ``mlp.experts.{e}.{gate,up,down}_proj.weight`` and ``mlp.gate.weight``). The defaults fit
    256-blocks (k-quants apply to every expert tensor) and 8 experts (llama-quantize's rules for
    8-expert models); ``intermediate_size`` is only the config key llama.cpp writes."""

    hidden_size: int = 256
    head_dim: int = 64
    intermediate_size: int = 768
    moe_intermediate_size: int = 512  # not hidden_size: a transposed expert shows in its shape
    num_experts: int = 8
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    router_std: float = 0.5  # routing logits far apart: a top-k choice is no coin toss between back ends


VARIANTS: dict[str, Qwen3Spec] = {
    "tied": Qwen3Spec(),
    "untied": Qwen3Spec(tie_word_embeddings=False, seed=1),
    # head_dim * heads != hidden_size, as in Qwen3-4B (2560 hidden, 32 x 128 heads)
    "odd-head-dim": Qwen3Spec(hidden_size=96, head_dim=32, seed=2),
    "sharded": Qwen3Spec(tie_word_embeddings=False, num_hidden_layers=3, shards=3, seed=3),
    "full-vocab": Qwen3Spec(
        vocab_size=QWEN3_VOCAB_ROWS, hidden_size=32, head_dim=8, intermediate_size=64, seed=4
    ),
}
# rows of 256 (q/k/v/gate/up) and 512 (ffn_down): whole 256-blocks, so every k-quant applies
# unchanged (the narrow VARIANTS fall back to legacy types); tests vary it with dataclasses.replace
WIDE = Qwen3Spec(hidden_size=256, head_dim=64, intermediate_size=512)
# Qwen3MoeForCausalLM fixtures, apart: VARIANTS are the dense ones
MOE_VARIANTS: dict[str, Qwen3MoeSpec] = {
    # Qwen3-MoE, untied like Qwen3-30B-A3B, two shards (experts of one layer in both)
    "moe": Qwen3MoeSpec(tie_word_embeddings=False, shards=2, seed=5),
    # 4 experts (llama-quantize's 8-expert rules off), tied, 8 layers (its layer-position rules)
    "moe-4": Qwen3MoeSpec(num_hidden_layers=8, num_experts=4, num_experts_per_tok=3, seed=6),
    # the real vocabulary, so that llama.cpp's convert_hf_to_gguf.py recognises the tokenizer
    "moe-full-vocab": Qwen3MoeSpec(vocab_size=QWEN3_VOCAB_ROWS, tie_word_embeddings=False, shards=2, seed=7),
}


def default_vocab_path() -> Path:
    from ggq import native

    return native.data_path("vocab", "ggml-vocab-qwen2.gguf")


@lru_cache(maxsize=2)
def qwen2_bpe(vocab_gguf: Path | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The BPE tokens (rank order) and merges of llama.cpp's Qwen2 vocabulary file."""
    from ggq.gguf import read_metadata

    path = vocab_gguf or default_vocab_path()
    meta = read_metadata(path)
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta["tokenizer.ggml.token_type"]
    merges = meta["tokenizer.ggml.merges"]
    n_bpe = int(np.count_nonzero(types == 1))  # 1 = normal; then control and padding entries
    if not np.all(types[:n_bpe] == 1):
        raise ValueError(f"{path}: normal tokens are not a prefix of the vocabulary")
    return tuple(tokens[:n_bpe]), tuple(merges)


def tokenizer_json(n_bpe: int = QWEN2_BPE_TOKENS, vocab_gguf: Path | None = None) -> dict[str, Any]:
    """A Hugging Face ``tokenizer.json`` with the first ``n_bpe`` BPE ranks and the added tokens."""
    all_tokens, all_merges = qwen2_bpe(vocab_gguf)
    tokens = all_tokens[:n_bpe]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = []
    for merge in all_merges:
        left, right = merge.split(" ")
        if left in vocab and right in vocab and left + right in vocab:
            merges.append([left, right])
    added = [
        {
            "id": n_bpe + i,
            "content": content,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": special,
        }
        for i, (content, special) in enumerate(QWEN3_ADDED_TOKENS)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN2_SPLIT_REGEX},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": False,
            "use_regex": False,
        },
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": False,
            "use_regex": False,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def bpe_count_for(vocab_size: int) -> int:
    """BPE ranks kept for an embedding of ``vocab_size`` rows (room for the added tokens)."""
    if vocab_size >= QWEN3_VOCAB_ROWS:
        return QWEN2_BPE_TOKENS
    n_bpe = vocab_size - len(QWEN3_ADDED_TOKENS)
    if n_bpe < 256:
        raise ValueError(f"vocab_size {vocab_size} leaves fewer than the 256 byte tokens")
    return n_bpe


def config_json(spec: Qwen3Spec) -> dict[str, Any]:
    """config.json in the layout of the official Qwen3 releases (top-level rope_theta)."""
    n_bpe = bpe_count_for(spec.vocab_size)
    moe: dict[str, Any] = {}
    if isinstance(spec, Qwen3MoeSpec):  # the keys of Qwen3-30B-A3B's config.json
        moe = {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "moe_intermediate_size": spec.moe_intermediate_size,
            "norm_topk_prob": spec.norm_topk_prob,
            "num_experts": spec.num_experts,
            "num_experts_per_tok": spec.num_experts_per_tok,
            "output_router_logits": False,
            "router_aux_loss_coef": 0.001,
        }
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": n_bpe,  # <|endoftext|>
        "eos_token_id": n_bpe + 2,  # <|im_end|>
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "max_window_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_key_value_heads": spec.num_key_value_heads,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": spec.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": spec.vocab_size,
    } | moe


def random_weights(spec: Qwen3Spec) -> dict[str, Any]:
    """Seeded random weights under the Hugging Face Qwen3 tensor names, as bf16 torch tensors."""
    return dict(iter_weights(spec))


def iter_weights(spec: Qwen3Spec) -> Iterator[tuple[str, Any]]:
    """``random_weights`` one tensor at a time (a checkpoint of billions of weights streams)."""
    import torch

    gen = torch.Generator().manual_seed(spec.seed)

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    def norm(n: int) -> torch.Tensor:  # around 1, not exactly 1, so a misplaced norm shows
        return (1.0 + 0.1 * torch.randn(n, generator=gen)).to(torch.bfloat16)

    h, hd, ff = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q_out, kv_out = spec.num_attention_heads * hd, spec.num_key_value_heads * hd
    yield "model.embed_tokens.weight", normal(spec.vocab_size, h)
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", norm(h)
        yield p + "self_attn.q_proj.weight", normal(q_out, h)  # (n_head * head_dim, hidden)
        yield p + "self_attn.k_proj.weight", normal(kv_out, h)
        yield p + "self_attn.v_proj.weight", normal(kv_out, h)
        yield p + "self_attn.o_proj.weight", normal(h, q_out)
        yield p + "self_attn.q_norm.weight", norm(hd)
        yield p + "self_attn.k_norm.weight", norm(hd)
        yield p + "post_attention_layernorm.weight", norm(h)
        if isinstance(spec, Qwen3MoeSpec):
            yield from _expert_weights(spec, p, normal)
            continue
        yield p + "mlp.gate_proj.weight", normal(ff, h)
        yield p + "mlp.up_proj.weight", normal(ff, h)
        yield p + "mlp.down_proj.weight", normal(h, ff)
    yield "model.norm.weight", norm(h)
    if not spec.tie_word_embeddings:
        yield "lm_head.weight", normal(spec.vocab_size, h)


def _expert_weights(spec: Qwen3MoeSpec, prefix: str, normal: Any) -> Iterator[tuple[str, Any]]:
    """One layer's router (num_experts, hidden) and experts, each (ff, hidden) / (hidden, ff)."""
    h, ff = spec.hidden_size, spec.moe_intermediate_size
    yield prefix + "mlp.gate.weight", normal(spec.num_experts, h, std=spec.router_std / h**0.5)
    for e in range(spec.num_experts):
        q = f"{prefix}mlp.experts.{e}."
        yield q + "gate_proj.weight", normal(ff, h)
        yield q + "up_proj.weight", normal(ff, h)
        yield q + "down_proj.weight", normal(h, ff)


def _write_streamed(path: Path, weights: Iterator[tuple[str, Any]], shard_bytes: int) -> None:
    """Weights in shards of about ``shard_bytes``, each written once full: only one shard is ever
    in memory (checkpoints of billions of weights on a machine with a few GB to spare)."""
    from safetensors.torch import save_file

    shards: list[list[str]] = []
    part: dict[str, Any] = {}
    total = 0

    def flush() -> None:
        save_file(part, str(path / f"part-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
        shards.append(list(part))
        part.clear()

    in_part = 0
    for name, tensor in weights:
        part[name] = tensor
        size = tensor.numel() * tensor.element_size()
        total, in_part = total + size, in_part + size
        if in_part >= shard_bytes:
            flush()
            in_part = 0
    if part:
        flush()
    weight_map = {}
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        (path / f"part-{k:05d}.safetensors").rename(path / fname)
        weight_map.update(dict.fromkeys(names, fname))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_weights(path: Path, weights: dict[str, Any], shards: int) -> None:
    from safetensors.torch import save_file

    meta = {"format": "pt"}
    if shards <= 1:
        save_file(weights, str(path / "model.safetensors"), metadata=meta)
        return
    names = list(weights)
    parts = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for k, part in enumerate(parts, start=1):
        fname = f"model-{k:05d}-of-{shards:05d}.safetensors"
        save_file({n: weights[n] for n in part}, str(path / fname), metadata=meta)
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def build_checkpoint(
    path: Path, spec: Qwen3Spec | str = "tied", vocab_gguf: Path | None = None, shard_bytes: int | None = None
) -> Path:
    """Write a complete Hugging Face Qwen3 checkpoint directory at ``path`` and return it;
    with ``shard_bytes``, streamed into shards of about that size instead of ``spec.shards``."""
    if isinstance(spec, str):
        known: dict[str, Qwen3Spec] = {**VARIANTS, **MOE_VARIANTS}
        if spec not in known:
            raise ValueError(f"unknown fixture variant {spec!r}; known: {', '.join(known)}")
        spec = known[spec]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n_bpe = bpe_count_for(spec.vocab_size)
    config = config_json(spec)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": n_bpe, "eos_token_id": [n_bpe + 2, n_bpe], "pad_token_id": n_bpe}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (path / "tokenizer.json").write_text(json.dumps(tokenizer_json(n_bpe, vocab_gguf), ensure_ascii=False))
    tok_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "chat_template": QWEN3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": spec.max_position_embeddings,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    (path / "ggq-fixture.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    if shard_bytes:
        _write_streamed(path, iter_weights(spec), shard_bytes)
    else:
        _write_weights(path, random_weights(spec), spec.shards)
    return path


def with_changes(name: str, **changes: Any) -> Qwen3Spec:
    """A named variant with some fields changed, e.g. ``with_changes("tied", num_hidden_layers=4)``."""
    return replace(VARIANTS[name], **changes)
