"""File-type recipes: which ggml type each tensor gets, by the rules of llama-quantize.

Mirrors ``llama_tensor_get_type`` of src/llama-quant.cpp at the pinned llama.cpp commit for the
recipes ggq writes (Q8_0 ... Q2_K, IQ4_NL/IQ4_XS, F16/BF16/F32), for dense and MoE Qwen3: the
output / tied-embedding rule, the ``use_more_bits`` layers of attn_v and ffn_down, the per-type
bumps, ``--pure``, ``--tensor-type``, ``--output-tensor-type``, ``--token-embedding-type`` and
the fallback when a row is not a whole number of blocks. Tests compare the plan with the one
llama-quantize itself makes, tensor by tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ggq import ggml
from ggq.errors import GGQError


@dataclass(frozen=True)
class FileType:
    name: str  # "Q4_K_M"
    llama_ftype: int  # enum llama_ftype, written as general.file_type
    default: str  # default tensor type


FILE_TYPES: dict[str, FileType] = {
    ft.name: ft
    for ft in (
        FileType("F32", 0, "F32"),
        FileType("F16", 1, "F16"),
        FileType("Q4_0", 2, "Q4_0"),
        FileType("Q4_1", 3, "Q4_1"),
        FileType("Q8_0", 7, "Q8_0"),
        FileType("Q5_0", 8, "Q5_0"),
        FileType("Q5_1", 9, "Q5_1"),
        FileType("Q2_K", 10, "Q2_K"),
        FileType("Q3_K_S", 11, "Q3_K"),
        FileType("Q3_K_M", 12, "Q3_K"),
        FileType("Q3_K_L", 13, "Q3_K"),
        FileType("Q4_K_S", 14, "Q4_K"),
        FileType("Q4_K_M", 15, "Q4_K"),
        FileType("Q5_K_S", 16, "Q5_K"),
        FileType("Q5_K_M", 17, "Q5_K"),
        FileType("Q6_K", 18, "Q6_K"),
        FileType("IQ4_NL", 25, "IQ4_NL"),
        FileType("IQ4_XS", 30, "IQ4_XS"),
        FileType("BF16", 32, "BF16"),
    )
}
# `--bits N` of convert and study: the llama.cpp-style recipe for N bits
BITS_RECIPES = {"2": "Q2_K", "3": "Q3_K_M", "4": "Q4_K_M", "5": "Q5_K_M", "6": "Q6_K", "8": "Q8_0"}
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

# where llama-quantize demotes a type whose block does not divide the row length
FALLBACK = {
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
    "IQ4_XS": "IQ4_NL",
}


class RecipeError(GGQError, ValueError):
    """An unknown file type or tensor type, or a bad --tensor-type pattern."""


def file_type(name: str) -> FileType:
    key = ALIASES.get(name.upper(), name.upper())
    if key not in FILE_TYPES:
        raise RecipeError(f"unknown file type {name!r}; known: {', '.join(FILE_TYPES)}")
    return FILE_TYPES[key]


def tensor_type(name: str) -> str:
    key = name.upper()
    if key not in ggml.FORMATS:
        raise RecipeError(f"unknown tensor type {name!r}; known: {', '.join(ggml.FORMATS)}")
    return key


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as the planner sees it: GGUF name, ggml shape (ne[0] = row length first)."""

    name: str
    shape: tuple[int, ...]
    src_type: str = "F32"


@dataclass(frozen=True)
class RecipeOptions:
    file_type: str = "Q4_K_M"
    pure: bool = False
    tensor_types: tuple[tuple[str, str], ...] = ()  # (regex, type), first match wins
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    leave_output_tensor: bool = False
    has_imatrix: bool = False


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0


@dataclass
class _Counters:
    n_attention_wv: int = 0
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0
    tied: bool = True
    fallbacks: list[str] = field(default_factory=list)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (
        ("attn_qkv.weight", "attn_v"),
        ("attn_kv_b.weight", "attn_v"),
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if key in name:
            return cat
    return "other"


def allows_quantization(t: TensorSpec, opts: RecipeOptions) -> bool:
    """2-D or 3-D weights other than norms and expert routers (llama-quantize's filter)."""
    if len(t.shape) < 2 or not t.name.endswith("weight") or "_norm.weight" in t.name:
        return False
    if opts.leave_output_tensor and t.name == "output.weight":
        return False
    return "ffn_gate_inp.weight" not in t.name


def _use_more_bits(i_layer: int, n_layer: int) -> bool:
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def _layer_of(name: str, counter: int, model: ModelShape) -> int:
    if model.n_expert > 1:  # experts are not consecutive: read the layer from the name
        m = re.match(r"blk\.(\d+)\.", name)
        if not m:
            raise RecipeError(f"cannot read the layer of tensor {name}")
        return int(m.group(1))
    return counter


def _fallback(t: TensorSpec, qtype: str, c: _Counters) -> str:
    ncols, block = t.shape[0], ggml.get(qtype).block_size
    if ncols % block == 0:
        return qtype
    out = FALLBACK.get(qtype, qtype)
    if ncols % ggml.get(out).block_size != 0:
        out = "F16"
    c.fallbacks.append(f"{t.name}: {ncols} columns not divisible by {block} for {qtype} -> {out}")
    return out


def _standard_rule(
    t: TensorSpec, qtype: str, ft: str, cat: str, model: ModelShape, opts: RecipeOptions, c: _Counters
) -> str:
    """llama_tensor_get_type_impl, for the file types of FILE_TYPES."""
    if cat == "output" or (c.tied and cat == "token_embd"):
        if opts.output_tensor_type:
            return tensor_type(opts.output_tensor_type)
        if t.shape[0] % ggml.get(qtype).block_size != 0:
            return "Q8_0"
        return qtype if qtype == "Q8_0" else "Q6_K"
    if cat == "token_embd":
        return qtype
    if cat == "attn_v":
        i, n = c.i_attention_wv, c.n_attention_wv
        c.i_attention_wv += 1
        if ft == "Q2_K":
            qtype = "Q4_K" if model.n_gqa >= 4 else "Q3_K"
        elif ft == "Q3_K_M":
            qtype = "Q5_K" if i < 2 else "Q4_K"
        elif ft == "Q3_K_L" or (ft in ("IQ4_NL", "IQ4_XS") and model.n_gqa >= 4):
            qtype = "Q5_K"
        elif ft in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            qtype = "Q6_K"
        elif ft == "Q4_K_S" and i < 4:
            qtype = "Q5_K"
        return "Q8_0" if model.n_expert == 8 else qtype
    if cat == "attn_k":
        return "Q8_0" if model.n_expert == 8 else qtype
    if cat == "ffn_down":
        i, n = _layer_of(t.name, c.i_ffn_down, model), model.n_layer
        c.i_ffn_down += 1
        if ft == "Q2_K":
            return "Q3_K"
        if ft == "Q3_K_M":
            return "Q5_K" if i < n // 16 else "Q4_K"
        if ft == "Q3_K_L":
            return "Q5_K"
        if ft == "Q4_K_M":
            return "Q6_K" if _use_more_bits(i, n) else qtype
        if i < n // 8 and ft in ("IQ4_NL", "IQ4_XS") and not opts.has_imatrix:
            return "Q5_K"
        if ft == "Q5_K_M" and _use_more_bits(i, n):
            return "Q6_K"
        if ft == "Q4_K_S" and i < n // 8:
            return "Q5_K"
        if ft in ("Q4_0", "Q5_0") and opts.has_imatrix and i < n // 8:
            return "Q4_1" if ft == "Q4_0" else "Q5_1"
        return qtype
    if cat == "attn_output":
        if model.n_expert == 8:
            bump = ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ4_XS")
            return "Q5_K" if ft in bump else qtype
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(ft, qtype)
    if cat == "ffn_gate":
        c.i_ffn_gate += 1
    elif cat == "ffn_up":
        c.i_ffn_up += 1
    return qtype


def plan(tensors: list[TensorSpec], model: ModelShape, opts: RecipeOptions) -> dict[str, str]:
    """Tensor name -> ggml type name, in the order of ``tensors`` (the file's order matters)."""
    ft = file_type(opts.file_type)
    default = ft.default
    patterns = []
    for pattern, qtype in opts.tensor_types:
        try:
            patterns.append((re.compile(pattern), tensor_type(qtype)))
        except re.error as exc:
            raise RecipeError(f"--tensor-type pattern {pattern!r} is not a valid regex: {exc}") from exc
    c = _Counters()
    c.n_attention_wv = sum(_category(t.name) == "attn_v" for t in tensors)
    c.tied = not any(t.name == "output.weight" for t in tensors)
    out: dict[str, str] = {}
    for t in tensors:
        out[t.name] = _tensor_type(t, model, opts, ft.name, default, patterns, c)
    return out


def _tensor_type(
    t: TensorSpec,
    model: ModelShape,
    opts: RecipeOptions,
    ft: str,
    default: str,
    patterns: list[tuple[re.Pattern[str], str]],
    c: _Counters,
) -> str:
    if not allows_quantization(t, opts):
        return t.src_type
    cat = _category(t.name)
    if opts.token_embedding_type and cat == "token_embd":
        return tensor_type(opts.token_embedding_type)
    if opts.output_tensor_type and cat == "output":
        return tensor_type(opts.output_tensor_type)
    if default in ggml.FLOAT_TYPES:
        return default
    qtype = default
    manual = next((q for p, q in patterns if p.search(t.name)), None)
    if manual is not None:
        qtype = manual
    elif not opts.pure:
        qtype = _standard_rule(t, qtype, ft, cat, model, opts, c)
    if qtype in ggml.FLOAT_TYPES:
        return qtype
    return _fallback(t, qtype, c)
