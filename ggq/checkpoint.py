"""Hugging Face checkpoints, read lazily: one tensor at a time, never the whole model in RAM.

Architecture knowledge is data: ``ARCHITECTURES`` maps a ``config.json`` architecture to the
GGUF architecture name and the table of tensor names.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class CheckpointError(ValueError):
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


@dataclass(frozen=True)
class Architecture:
    hf_name: str
    gguf_name: str
    tensors: tuple[tuple[str, str], ...]
    layer_order: tuple[str, ...]


ARCHITECTURES: dict[str, Architecture] = {
    "Qwen3ForCausalLM": Architecture("Qwen3ForCausalLM", "qwen3", QWEN3_TENSORS, QWEN3_LAYER_ORDER),
}


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

    @classmethod
    def from_config(cls, cfg: dict[str, Any], where: Path) -> HParams:
        try:
            n_head = int(cfg["num_attention_heads"])
            n_embd = int(cfg["hidden_size"])
            rope_params = cfg.get("rope_parameters") or {}
            rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
            scaling = cfg.get("rope_scaling")
            if scaling is None and rope_params.get("rope_type", "default") != "default":
                scaling = rope_params
            return cls(
                n_layer=int(cfg["num_hidden_layers"]),
                n_embd=n_embd,
                n_ff=int(cfg["intermediate_size"]),
                n_head=n_head,
                n_head_kv=int(cfg.get("num_key_value_heads", n_head)),
                head_dim=int(cfg.get("head_dim") or n_embd // n_head),
                n_vocab=int(cfg["vocab_size"]),
                n_ctx_train=int(cfg.get("max_position_embeddings", 32768)),
                rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                rope_scaling=scaling,
            )
        except KeyError as exc:
            raise CheckpointError(f"{where}: config.json has no {exc.args[0]!r}") from exc


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
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: not found") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc


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
    header.pop("__metadata__", None)
    return dict(header), 8 + n


class Checkpoint:
    """A local Hugging Face checkpoint directory."""

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
        self.hparams = HParams.from_config(self.config, self.path / "config.json")
        self.entries = self._index()

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

    def _index(self) -> dict[str, TensorEntry]:
        entries: dict[str, TensorEntry] = {}
        for file in self._files():
            if not file.is_file():
                raise CheckpointError(f"{file}: listed in the index but missing")
            header, data_start = _safetensors_header(file)
            file_size = file.stat().st_size
            for hf_name, info in header.items():
                gguf_name = self._map_name(hf_name)
                if gguf_name is None:
                    if hf_name.endswith("rotary_emb.inv_freq"):
                        continue
                    raise CheckpointError(f"{file}: unexpected tensor {hf_name} for {self.arch.hf_name}")
                if info["dtype"] not in SUPPORTED_DTYPES:
                    raise CheckpointError(
                        f"{file}: tensor {hf_name} has dtype {info['dtype']}; supported: BF16, F16, F32"
                    )
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
                if (
                    end - begin != int(np.prod(shape)) * _ITEMSIZE[info["dtype"]]
                    or data_start + end > file_size
                ):
                    raise CheckpointError(
                        f"{file}: tensor {hf_name} data does not fit its shape or the file (corrupt?)"
                    )
                entries[gguf_name] = TensorEntry(
                    hf_name, gguf_name, file, shape, info["dtype"], data_start + begin
                )
        return entries

    def gguf_order(self) -> list[str]:
        """GGUF tensor names in file order: embeddings, layers ascending, final norm, output."""
        names = ["token_embd.weight"]
        for i in range(self.hparams.n_layer):
            names += [f"blk.{i}.{part}.weight" for part in self.arch.layer_order]
        names.append("output_norm.weight")
        if not self.hparams.tie_word_embeddings:
            names.append("output.weight")
        missing = [n for n in names if n not in self.entries]
        if missing:
            raise CheckpointError(
                f"{self.path}: missing tensors {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
            )
        return names

    def load(self, gguf_name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of one tensor as float32, in HF (torch) layout, read straight from
        the file: only those rows are ever in memory (bf16 widened exactly, no torch needed)."""
        entry = self.entries[gguf_name]
        rows = entry.n_rows
        stop = rows if stop is None else min(stop, rows)
        row_len = int(np.prod(entry.shape)) // rows
        size = _ITEMSIZE[entry.dtype]
        dtype = {"BF16": "<u2", "F16": "<f2", "F32": "<f4"}[entry.dtype]
        offset = entry.offset + start * row_len * size
        raw = np.fromfile(entry.file, dtype=dtype, count=(stop - start) * row_len, offset=offset)
        values = (
            (raw.astype(np.uint32) << 16).view(np.float32)
            if entry.dtype == "BF16"
            else raw.astype(np.float32)
        )
        shape = (stop - start, *entry.shape[1:]) if len(entry.shape) > 1 else entry.shape
        return values.reshape(shape)

    def n_params(self) -> int:
        return sum(int(np.prod(e.shape)) for e in self.entries.values())


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
