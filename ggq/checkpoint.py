"""Hugging Face checkpoints, read lazily: one tensor at a time, never the whole model in RAM.

Architecture knowledge is data: ``ARCHITECTURES`` maps a ``config.json`` architecture to the
GGUF architecture name and the table of tensor names. A mixture-of-experts checkpoint
(Qwen3-MoE) ships one 2-D tensor per expert; they appear here as llama.cpp's merged 3-D
``ffn_{gate,up,down}_exps`` tensors, read one expert at a time straight from the files.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ggq.errors import GGQError


class CheckpointError(GGQError, ValueError):
    """A checkpoint that cannot be read; the message names the file or tensor at fault."""


# HF tensor name (regex, {bid} = layer) -> GGUF tensor name
QWEN3_TENSORS: tuple[tuple[str, str], ...] = (
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "blk.{bid}.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "blk.{bid}.attn_q.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "blk.{bid}.attn_k.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "blk.{bid}.attn_v.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "blk.{bid}.attn_output.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_norm\.weight", "blk.{bid}.attn_q_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_norm\.weight", "blk.{bid}.attn_k_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "blk.{bid}.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "blk.{bid}.ffn_gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "blk.{bid}.ffn_up.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "blk.{bid}.ffn_down.weight"),
)

# Order of a layer's tensors in the GGUF (llama-quantize's layer counters follow file order).
QWEN3_LAYER_ORDER = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "attn_q_norm",
    "attn_k_norm",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)


# GGUF tensor (without "blk.N." and ".weight") -> its HF (torch) shape in config.json's terms;
# each dimension is a key of HParams.dims()
QWEN3_SHAPES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("token_embd", ("vocab_size", "hidden_size")),
    ("output_norm", ("hidden_size",)),
    ("output", ("vocab_size", "hidden_size")),
    ("attn_norm", ("hidden_size",)),
    ("attn_q", ("num_attention_heads*head_dim", "hidden_size")),
    ("attn_k", ("num_key_value_heads*head_dim", "hidden_size")),
    ("attn_v", ("num_key_value_heads*head_dim", "hidden_size")),
    ("attn_output", ("hidden_size", "num_attention_heads*head_dim")),
    ("attn_q_norm", ("head_dim",)),
    ("attn_k_norm", ("head_dim",)),
    ("ffn_norm", ("hidden_size",)),
    ("ffn_gate", ("intermediate_size", "hidden_size")),
    ("ffn_up", ("intermediate_size", "hidden_size")),
    ("ffn_down", ("hidden_size", "intermediate_size")),
)


# Qwen3-MoE: attention as Qwen3; the MLP is a router and num_experts SwiGLU experts
_DENSE_MLP = ("ffn_gate", "ffn_up", "ffn_down")
QWEN3MOE_TENSORS: tuple[tuple[str, str], ...] = (
    *(t for t in QWEN3_TENSORS if not any(f".{p}." in t[1] for p in _DENSE_MLP)),
    (r"model\.layers\.(\d+)\.mlp\.gate\.weight", "blk.{bid}.ffn_gate_inp.weight"),
)
# per-expert HF tensor (groups: layer, expert) -> the merged GGUF tensor it is a slice of
QWEN3MOE_EXPERTS: tuple[tuple[str, str], ...] = (
    (r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.gate_proj\.weight", "blk.{bid}.ffn_gate_exps.weight"),
    (r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.up_proj\.weight", "blk.{bid}.ffn_up_exps.weight"),
    (r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.down_proj\.weight", "blk.{bid}.ffn_down_exps.weight"),
)
QWEN3MOE_LAYER_ORDER = (
    *(p for p in QWEN3_LAYER_ORDER if p not in _DENSE_MLP),
    "ffn_gate_inp",
    "ffn_gate_exps",
    "ffn_up_exps",
    "ffn_down_exps",
)
QWEN3MOE_SHAPES: tuple[tuple[str, tuple[str, ...]], ...] = (
    *(s for s in QWEN3_SHAPES if s[0] not in _DENSE_MLP),
    ("ffn_gate_inp", ("num_experts", "hidden_size")),
    ("ffn_gate_exps", ("num_experts", "moe_intermediate_size", "hidden_size")),
    ("ffn_up_exps", ("num_experts", "moe_intermediate_size", "hidden_size")),
    ("ffn_down_exps", ("num_experts", "hidden_size", "moe_intermediate_size")),
)


@dataclass(frozen=True)
class Architecture:
    hf_name: str
    gguf_name: str
    tensors: tuple[tuple[str, str], ...]
    layer_order: tuple[str, ...]
    shapes: tuple[tuple[str, tuple[str, ...]], ...]
    experts: tuple[tuple[str, str], ...] = ()  # per-expert tensors, merged into 3-D ones

    @property
    def is_moe(self) -> bool:
        return bool(self.experts)


ARCHITECTURES: dict[str, Architecture] = {
    "Qwen3ForCausalLM": Architecture(
        "Qwen3ForCausalLM", "qwen3", QWEN3_TENSORS, QWEN3_LAYER_ORDER, QWEN3_SHAPES
    ),
    "Qwen3MoeForCausalLM": Architecture(
        "Qwen3MoeForCausalLM",
        "qwen3moe",
        QWEN3MOE_TENSORS,
        QWEN3MOE_LAYER_ORDER,
        QWEN3MOE_SHAPES,
        QWEN3MOE_EXPERTS,
    ),
}


def _part(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``attn_q``; ``token_embd.weight`` -> ``token_embd``."""
    parts = gguf_name.split(".")
    return parts[2] if parts[0] == "blk" else parts[0]


def _layer(gguf_name: str) -> int | None:
    return int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else None


def _shape_str(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + (",)" if len(shape) == 1 else ")")


@dataclass(frozen=True)
class HParams:
    """The hyper-parameters llama.cpp reads, from config.json (transformers 4 and 5 layouts)."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx_train: int
    rms_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    rope_scaling: dict[str, Any] | None
    n_expert: int = 0  # 0: a dense model
    n_expert_used: int = 0
    n_ff_exp: int = 0  # moe_intermediate_size

    @classmethod
    def from_config(cls, cfg: dict[str, Any], where: Path, moe: bool = False) -> HParams:
        """Every number checked: a zero, negative, fractional or missing size is named here, not
        found later as a crash (a division by zero heads) or a file llama.cpp refuses."""
        n_head = _positive_int(cfg, "num_attention_heads", where)
        n_head_kv = _positive_int(cfg, "num_key_value_heads", where, default=n_head)
        n_embd = _positive_int(cfg, "hidden_size", where)
        if cfg.get("head_dim") is None and n_embd % n_head:
            raise CheckpointError(
                f"{where}: hidden_size {n_embd} is not a multiple of num_attention_heads {n_head} "
                "and there is no head_dim"
            )
        if n_head % n_head_kv:
            raise CheckpointError(
                f"{where}: num_attention_heads {n_head} is not a multiple of num_key_value_heads {n_head_kv}"
            )
        rope_params = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling")
        if scaling is None and rope_params.get("rope_type", "default") != "default":
            scaling = rope_params
        theta = cfg.get("rope_theta")
        theta_cfg = {"rope_theta": rope_params.get("rope_theta", 10000.0) if theta is None else theta}
        return cls(
            n_layer=_positive_int(cfg, "num_hidden_layers", where),
            n_embd=n_embd,
            n_ff=_positive_int(cfg, "intermediate_size", where),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=_positive_int(cfg, "head_dim", where, default=n_embd // n_head),
            n_vocab=_positive_int(cfg, "vocab_size", where),
            n_ctx_train=_positive_int(cfg, "max_position_embeddings", where, default=32768),
            rms_eps=_positive_float(cfg, "rms_norm_eps", where, default=1e-6),
            rope_theta=_positive_float(theta_cfg, "rope_theta", where),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=scaling,
            **(_moe_config(cfg, where) if moe else {}),
        )

    def dims(self) -> dict[str, int]:
        """Tensor dimensions by the config.json terms they come from (QWEN3_SHAPES)."""
        return {
            "num_experts": self.n_expert,
            "moe_intermediate_size": self.n_ff_exp,
            "vocab_size": self.n_vocab,
            "hidden_size": self.n_embd,
            "intermediate_size": self.n_ff,
            "head_dim": self.head_dim,
            "num_attention_heads*head_dim": self.n_head * self.head_dim,
            "num_key_value_heads*head_dim": self.n_head_kv * self.head_dim,
        }


def _moe_config(cfg: dict[str, Any], where: Path) -> dict[str, int]:
    """The expert counts of a Qwen3-MoE config.json, and the layouts llama.cpp's ``qwen3moe``
    cannot run: it has experts in every layer and always renormalises the top-k routing weights,
    so a file of any other model would load and compute something else."""
    keys = [k for k in ("num_local_experts", "num_experts") if cfg.get(k) is not None]
    n_expert = _positive_int(cfg, keys[0] if keys else "num_experts", where)
    if len({cfg[k] for k in keys}) > 1:  # transformers 5 writes num_local_experts
        raise CheckpointError(
            f"{where}: num_local_experts {cfg['num_local_experts']} and num_experts {cfg['num_experts']} disagree"
        )
    n_used = _positive_int(cfg, "num_experts_per_tok", where)
    if n_used > n_expert:
        raise CheckpointError(f"{where}: num_experts_per_tok {n_used} is more than num_experts {n_expert}")
    dense = cfg.get("mlp_only_layers") or []
    if dense:
        raise CheckpointError(
            f"{where}: mlp_only_layers {dense}: dense layers between the MoE ones are not supported "
            "(llama.cpp's qwen3moe has experts in every layer)"
        )
    step = cfg.get("decoder_sparse_step", 1)
    if step != 1:
        raise CheckpointError(
            f"{where}: decoder_sparse_step {step!r}: only 1 is supported "
            "(llama.cpp's qwen3moe has experts in every layer)"
        )
    if cfg.get("norm_topk_prob") is not True:
        raise CheckpointError(
            f"{where}: norm_topk_prob is {cfg.get('norm_topk_prob')!r}; llama.cpp's qwen3moe always "
            "renormalises the top-k routing weights (as norm_topk_prob true), so the file would compute "
            "another model"
        )
    return {
        "n_expert": n_expert,
        "n_expert_used": n_used,
        "n_ff_exp": _positive_int(cfg, "moe_intermediate_size", where),
    }


def _positive_int(cfg: dict[str, Any], key: str, where: Path, default: int | None = None) -> int:
    value = cfg.get(key)
    if value is None:
        if default is None:
            raise CheckpointError(f"{where}: config.json has no {key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{where}: {key} is {value!r}; expected a positive integer")
    return value


def _positive_float(cfg: dict[str, Any], key: str, where: Path, default: float | None = None) -> float:
    value = default if cfg.get(key) is None else cfg[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise CheckpointError(f"{where}: {key} is {value!r}; expected a positive number")
    return float(value)


@dataclass(frozen=True)
class TensorEntry:
    hf_name: str
    gguf_name: str
    file: Path
    shape: tuple[int, ...]  # HF (torch) order: (out_features, in_features)
    dtype: str  # safetensors dtype: "BF16", "F16", "F32"
    offset: int  # absolute byte offset of the data in the file

    @property
    def n_rows(self) -> int:
        return self.shape[0] if len(self.shape) > 1 else 1


_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4}


SUPPORTED_DTYPES = ("BF16", "F16", "F32")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: not found") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from exc
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(doc).__name__}")
    return doc


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a .safetensors file (names, dtypes, shapes, offsets) and where data starts."""
    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > path.stat().st_size:
                raise CheckpointError(f"{path}: not a safetensors file (bad header length {n})")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (the header is not a JSON object)")
    header.pop("__metadata__", None)
    return header, 8 + n


def _entry(
    file: Path, hf_name: str, gguf_name: str, info: Any, data_start: int, file_size: int
) -> TensorEntry:
    """One header entry, checked: a supported dtype, and data that fits its shape and the file."""
    try:
        dtype = str(info["dtype"])
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: tensor {hf_name} has a malformed header entry ({exc!r})") from exc
    if dtype not in SUPPORTED_DTYPES:
        raise CheckpointError(
            f"{file}: tensor {hf_name} has dtype {dtype}; supported: {', '.join(SUPPORTED_DTYPES)}"
        )
    if (
        min(shape, default=1) < 0
        or end - begin != int(np.prod(shape)) * _ITEMSIZE[dtype]
        or not 0 <= begin <= end
        or data_start + end > file_size
    ):
        raise CheckpointError(f"{file}: tensor {hf_name} data does not fit its shape or the file (corrupt?)")
    return TensorEntry(hf_name, gguf_name, file, shape, dtype, data_start + begin)


class Checkpoint:
    """A local Hugging Face checkpoint directory, checked against its config.json when opened."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory")
        self.config = _read_json(self.path / "config.json")
        archs = self.config.get("architectures") or []
        found = next((a for a in archs if a in ARCHITECTURES), None)
        if found is None:
            raise CheckpointError(
                f"{self.path / 'config.json'}: architecture {', '.join(archs) or '(none)'} is not supported; "
                f"supported: {', '.join(ARCHITECTURES)}"
            )
        self.arch = ARCHITECTURES[found]
        self.hparams = HParams.from_config(self.config, self.path / "config.json", self.arch.is_moe)
        # merged GGUF name -> its experts' HF tensors, expert 0 first (MoE only)
        self.experts: dict[str, list[TensorEntry]] = {}
        self.entries = self._index()
        self._validate()
        self._check_tokenizer()

    def _files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map", {})
            return [self.path / f for f in sorted(set(weight_map.values()))]
        single = self.path / "model.safetensors"
        if single.is_file():
            return [single]
        raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json")

    def _map_name(self, hf_name: str) -> str | None:
        for pattern, template in self.arch.tensors:
            m = re.fullmatch(pattern, hf_name)
            if m:
                return template.format(bid=m.group(1)) if m.groups() else template
        return None

    def _expert_of(self, hf_name: str) -> tuple[str, int] | None:
        """(merged GGUF name, expert id) of a per-expert tensor, else None."""
        for pattern, template in self.arch.experts:
            m = re.fullmatch(pattern, hf_name)
            if m:
                return template.format(bid=m.group(1)), int(m.group(2))
        return None

    def _index(self) -> dict[str, TensorEntry]:
        entries: dict[str, TensorEntry] = {}
        experts: dict[str, dict[int, TensorEntry]] = {}
        for file in self._files():
            if not file.is_file():
                raise CheckpointError(f"{file}: listed in the index but missing")
            header, data_start = _safetensors_header(file)
            file_size = file.stat().st_size
            for hf_name, info in header.items():
                expert = self._expert_of(hf_name)
                gguf_name = expert[0] if expert else self._map_name(hf_name)
                if gguf_name is None:
                    if hf_name.endswith("rotary_emb.inv_freq"):
                        continue
                    raise CheckpointError(f"{file}: unexpected tensor {hf_name} for {self.arch.hf_name}")
                entry = _entry(file, hf_name, gguf_name, info, data_start, file_size)
                if expert:
                    experts.setdefault(gguf_name, {})[expert[1]] = entry  # names are unique per file
                    continue
                if gguf_name in entries:
                    raise CheckpointError(f"{file}: tensor {hf_name} is also in {entries[gguf_name].file}")
                entries[gguf_name] = entry
        for name, parts in experts.items():
            entries[name] = self._merge_experts(name, parts)
        return entries

    def _merge_experts(self, name: str, parts: dict[int, TensorEntry]) -> TensorEntry:
        """One layer's experts of one projection as llama.cpp's 3-D tensor: every expert present,
        each with the shape config.json implies (checked here, where the expert can be named)."""
        hp, where = self.hparams, self.path / "config.json"
        beyond = [e for e in sorted(parts) if e >= hp.n_expert]
        if beyond:
            e = parts[beyond[0]]
            raise CheckpointError(
                f"{e.file}: tensor {e.hf_name} is expert {beyond[0]}, but {where} has num_experts {hp.n_expert}"
            )
        shape, terms = self.expected_shape(name)
        expected_2d, terms = shape[1:], terms[1:]  # one expert: (rows, row length)
        for e in parts.values():
            if e.shape != expected_2d:
                raise CheckpointError(
                    f"{e.file}: tensor {e.hf_name} has shape {_shape_str(e.shape)}, but {where} "
                    f"expects {_shape_str(expected_2d)} = ({', '.join(terms)})"
                )
        missing = [e for e in range(hp.n_expert) if e not in parts]
        if missing:
            some = parts[min(parts)].hf_name.replace(f".experts.{min(parts)}.", f".experts.{missing[0]}.")
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise CheckpointError(f"{self.path}: missing tensor {some}{more} (num_experts {hp.n_expert})")
        first = parts[0]
        self.experts[name] = [parts[e] for e in range(hp.n_expert)]
        return TensorEntry(
            first.hf_name.replace(".experts.0.", f".experts.{{0..{hp.n_expert - 1}}}."),
            name,
            first.file,
            (hp.n_expert, *first.shape),
            first.dtype,
            -1,  # no single offset: read through self.experts
        )

    def _names(self) -> list[str]:
        names = ["token_embd.weight"]
        for i in range(self.hparams.n_layer):
            names += [f"blk.{i}.{part}.weight" for part in self.arch.layer_order]
        names.append("output_norm.weight")
        if not self.hparams.tie_word_embeddings:
            names.append("output.weight")
        return names

    def hf_name(self, gguf_name: str) -> str:
        """The Hugging Face name of a GGUF tensor name (for messages about absent tensors)."""
        bid = _layer(gguf_name)
        for pattern, template in self.arch.tensors:
            if template.format(bid=bid) == gguf_name:
                return pattern.replace(r"(\d+)", str(bid)).replace("\\.", ".")
        for pattern, template in self.arch.experts:  # a merged tensor: its expert 0
            if template.format(bid=bid) == gguf_name:
                return pattern.replace(r"(\d+)", str(bid), 1).replace(r"(\d+)", "0").replace("\\.", ".")
        return gguf_name

    def expected_shape(self, gguf_name: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """The HF shape config.json implies for a tensor, and the config terms of each dimension."""
        terms = dict(self.arch.shapes)[_part(gguf_name)]
        dims = self.hparams.dims()
        return tuple(dims[t] for t in terms), terms

    def _validate(self) -> None:
        """Every tensor's shape against config.json, before anything is planned or written:
        llama.cpp refuses a file whose tensors disagree with its header, after the whole
        conversion; this names the tensor, the expected and the found shape instead."""
        hp, where = self.hparams, self.path / "config.json"
        for e in self.entries.values():
            bid = _layer(e.gguf_name)
            if bid is not None and bid >= hp.n_layer:
                raise CheckpointError(
                    f"{e.file}: tensor {e.hf_name} is in layer {bid}, but {where} has "
                    f"num_hidden_layers {hp.n_layer}"
                )
        names = self._names()
        extra = [n for n in self.entries if n not in names]  # lm_head beside tied embeddings
        for name in names + extra:
            if name not in self.entries:
                raise self._missing(name, names)
            e = self.entries[name]
            expected, terms = self.expected_shape(name)
            if e.shape != expected:
                raise CheckpointError(
                    f"{e.file}: tensor {e.hf_name} has shape {_shape_str(e.shape)}, but {where} "
                    f"expects {_shape_str(expected)} = ({', '.join(terms)})"
                )

    def _missing(self, name: str, names: list[str]) -> CheckpointError:
        hp, where = self.hparams, self.path / "config.json"
        bid = _layer(name)
        if bid is not None and not any(_layer(n) == bid for n in self.entries):
            return CheckpointError(
                f"{self.path}: {where.name} has num_hidden_layers {hp.n_layer}, but the weights have "
                f"no tensors of layer {bid} ({self.hf_name(name).split(f'.{bid}.')[0]}.{bid}.*)"
            )
        missing = [n for n in names if n not in self.entries]
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        why = " (tie_word_embeddings is false)" if name == "output.weight" else ""
        return CheckpointError(f"{self.path}: missing tensor {self.hf_name(name)}{more}{why}")

    def _check_tokenizer(self) -> None:
        """Token ids must be embedding rows: a tokenizer larger than vocab_size has no row for
        its last tokens (the GGUF vocabulary is sized by vocab_size, as llama.cpp's converter)."""
        path = self.path / "tokenizer.json"
        if not path.is_file():
            return  # metadata names the missing tokenizer
        try:
            tok = json.loads(path.read_text(encoding="utf-8"))
            ids = [(int(i), t) for t, i in tok["model"]["vocab"].items()]
            ids += [(int(a["id"]), a["content"]) for a in tok.get("added_tokens", [])]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path}: cannot read the tokenizer ({type(exc).__name__}: {exc})") from exc
        top, text = max(ids, default=(-1, ""))
        if top >= self.hparams.n_vocab:
            raise CheckpointError(
                f"{path}: token {text!r} has id {top}, but config.json has vocab_size "
                f"{self.hparams.n_vocab} (embedding rows 0-{self.hparams.n_vocab - 1})"
            )

    def gguf_order(self) -> list[str]:
        """GGUF tensor names in file order: embeddings, layers ascending, final norm, output."""
        return self._names()

    def load(self, gguf_name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of one tensor as float32, in HF (torch) layout, read straight from
        the file: only those rows are ever in memory (bf16 widened exactly, no torch needed).
        A merged expert tensor's rows are its experts: ``(stop - start, rows, row length)``."""
        if gguf_name in self.experts:
            parts = self.experts[gguf_name][start:stop]
            return np.stack([_read(e, 0, None) for e in parts])
        return _read(self.entries[gguf_name], start, stop)

    def source_name(self, gguf_name: str, row: int = 0) -> str:
        """The HF tensor that row ``row`` of a GGUF tensor comes from (of a merged one: expert ``row``)."""
        if gguf_name in self.experts:
            return self.experts[gguf_name][row].hf_name
        return self.entries[gguf_name].hf_name

    def param_counts(self) -> tuple[int, int, int, int]:
        """(total, shared, per-expert, expert count) parameters, as gguf-py counts them for
        its size label (``8x0.5M``-style for MoE)."""
        total = self.n_params()
        per_expert = sum(math.prod(self.entries[n].shape[1:]) for n in self.experts)
        shared = total - per_expert * self.hparams.n_expert
        return total, shared, per_expert, self.hparams.n_expert

    def n_params(self) -> int:
        return sum(int(np.prod(e.shape)) for e in self.entries.values())


def _read(entry: TensorEntry, start: int, stop: int | None) -> np.ndarray:
    """Rows ``start:stop`` of one safetensors tensor as float32 (bf16 widened exactly)."""
    rows = entry.n_rows
    stop = rows if stop is None else min(stop, rows)
    row_len = int(np.prod(entry.shape)) // rows
    size = _ITEMSIZE[entry.dtype]
    dtype = {"BF16": "<u2", "F16": "<f2", "F32": "<f4"}[entry.dtype]
    offset = entry.offset + start * row_len * size
    raw = np.fromfile(entry.file, dtype=dtype, count=(stop - start) * row_len, offset=offset)
    values = (
        (raw.astype(np.uint32) << 16).view(np.float32) if entry.dtype == "BF16" else raw.astype(np.float32)
    )
    shape = (stop - start, *entry.shape[1:]) if len(entry.shape) > 1 else entry.shape
    return values.reshape(shape)


def resolve(model: str) -> Path:
    """A local directory as is; otherwise a hub id fetched with huggingface_hub (clear error offline)."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        raise CheckpointError(f"{model}: no such directory, and not a Hugging Face hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            model, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
        )
    except Exception as exc:  # the hub client raises many types (offline, 404, gated)
        raise CheckpointError(
            f"{model}: cannot fetch from the Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "offline? download the checkpoint elsewhere and pass its directory"
        ) from exc
    return Path(local)
