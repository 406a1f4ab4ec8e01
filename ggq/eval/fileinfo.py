"""What a GGUF file is, for the tables of ``ggq ppl``, ``ggq bench`` and the study: its recipe
(general.file_type, as llama-quantize names it), the ggq method that made it, size and bits per
weight."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ggq import ggml
from ggq.gguf import read_gguf
from ggq.plan import recipe as rc

_FTYPE_NAMES = {ft.llama_ftype: name for name, ft in rc.FILE_TYPES.items()}


@dataclass(frozen=True)
class FileInfo:
    type: str  # the recipe, as llama-quantize names it (general.file_type)
    method: str | None  # ggq.method for files ggq made
    size_mib: float
    bpw: float  # bits per weight over every tensor of the file


def file_info(path: Path) -> FileInfo:
    gg = read_gguf(path)
    ftype = int(gg.metadata.get("general.file_type", -1)) & ~1024  # 1024: llama.cpp's "guessed" flag
    n_bytes = sum(t.nbytes for t in gg.tensors.values())
    n_weights = sum(math.prod(t.shape) for t in gg.tensors.values())
    name = _FTYPE_NAMES.get(ftype, f"ftype {ftype}")
    # llama-quantize copies every key of its input: ggq.* of a ggq F32 describe that file, not this one
    method = gg.metadata.get("ggq.method") if gg.metadata.get("ggq.recipe") == name else None
    return FileInfo(
        type=name,
        method=str(method) if method is not None else None,
        size_mib=path.stat().st_size / 2**20,
        bpw=8 * n_bytes / n_weights if n_weights else math.nan,
    )


def type_label(info: FileInfo) -> str:
    """ "Q4_K_M ggq awq", "Q4_0 llama.cpp" (a quant ggq did not make), "F32"."""
    if info.type in ggml.FLOAT_TYPES:
        return info.type
    return f"{info.type} ggq {info.method}" if info.method else f"{info.type} llama.cpp"
