"""llama.cpp importance matrices (the GGUF format written by llama-imatrix).

Each weight ``W`` has ``W.in_sum2`` (sum of squared input activations per column, per expert)
and ``W.counts`` (tokens seen); the importance llama-quantize uses is ``in_sum2 / counts``
in float32, or 1 where nothing was seen. llama-quantize refuses a GGUF imatrix without the
keys ``imatrix.datasets``, ``imatrix.chunk_count`` and ``imatrix.chunk_size``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ggq.errors import GGQError
from ggq.gguf import GGUFFormatError, read_gguf
from ggq.gguf.writer import GGUFWriter, ValueType

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
F32_TYPE = 0  # ggml's GGML_TYPE_F32


class ImatrixError(GGQError, ValueError):
    """An imatrix file that cannot be used; names the file and entry."""


@dataclass(frozen=True)
class Imatrix:
    """An imatrix file's content: raw sums and counts per weight, and its provenance."""

    sums: dict[str, np.ndarray]  # name -> (n_expert, n_per_row) float32 sum of x^2 per input column
    counts: dict[str, np.ndarray]  # name -> (n_expert,) int64 tokens seen
    datasets: list[str]
    chunk_count: int
    chunk_size: int


def read_imatrix(path: str | Path) -> Imatrix:
    """The raw sums and counts of a llama-imatrix GGUF file, as llama.cpp's loader reads them."""
    path = Path(path)
    try:
        gg = read_gguf(path)
    except (GGUFFormatError, OSError) as exc:
        raise ImatrixError(f"{path}: not a llama.cpp imatrix GGUF ({exc})") from exc
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for name in gg.tensors:
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        if base + ".counts" not in gg.tensors:
            raise ImatrixError(f"{path}: {name} has no matching {base}.counts")
        n = gg.tensor_f32(base + ".counts").reshape(-1)  # (n_expert,)
        sums[base] = np.array(gg.tensor_f32(name).reshape(n.shape[0], -1))  # (n_expert, n_per_row)
        counts[base] = np.rint(n).astype(np.int64)  # whole numbers; llama.cpp's loader lrounds them
    if not sums:
        raise ImatrixError(f"{path}: no .in_sum2 entries (not an imatrix file?)")
    meta = gg.metadata
    return Imatrix(
        sums,
        counts,
        [str(d) for d in meta.get(KEY_DATASETS, [])],
        int(meta.get(KEY_CHUNK_COUNT, 0)),
        int(meta.get(KEY_CHUNK_SIZE, 0)),
    )


def load_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """Tensor name -> (n_per_row,) float32 importance (first expert's slice for dense models)."""
    path = Path(path)
    im = read_imatrix(path)
    out: dict[str, np.ndarray] = {}
    for base, sums in im.sums.items():
        counts = im.counts[base].astype(np.float32)  # (n_expert,)
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.where(counts[:, None] > 0, sums / counts[:, None], np.float32(1))
        if not np.all(np.isfinite(values)):
            raise ImatrixError(f"{path}: {base} contains non-finite values")
        values = values.astype(np.float32)
        out[base] = values.reshape(-1) if counts.shape[0] == 1 else values
    return out


def save_imatrix(
    path: str | Path,
    entries: Mapping[str, tuple[np.ndarray, int | np.ndarray]],
    datasets: Sequence[str],
    chunk_count: int,
    chunk_size: int,
) -> Path:
    """Write ``entries`` (name -> (sum of x^2 per input column ``(n_per_row,)`` or
    ``(n_expert, n_per_row)``, tokens seen: an int or ``(n_expert,)``)) as llama-imatrix does:
    keys first, then ``<name>.in_sum2`` F32 [n_per_row, n_expert] and ``<name>.counts`` F32
    [1, n_expert] for each name in sorted order."""
    path = Path(path)
    tensors: list[tuple[str, np.ndarray]] = []
    for name in sorted(entries):
        sums, count = entries[name]
        sums = np.asarray(sums, dtype=np.float32)
        sums = sums.reshape(1, -1) if sums.ndim == 1 else sums  # (n_expert, n_per_row)
        counts = np.asarray(count, dtype=np.float64).reshape(-1)  # (n_expert,)
        if sums.ndim != 2 or counts.shape[0] != sums.shape[0] or sums.shape[1] == 0:
            raise ImatrixError(
                f"{path}: {name}: sums of shape {sums.shape} do not match {counts.shape[0]} count(s)"
            )
        if not (np.all(np.isfinite(sums)) and np.all(sums >= 0) and np.all(counts >= 0)):
            raise ImatrixError(f"{path}: {name}: sums and counts must be finite and non-negative")
        tensors += [(f"{name}.in_sum2", sums), (f"{name}.counts", counts.astype(np.float32).reshape(-1, 1))]
    if not tensors:
        raise ImatrixError(f"{path}: no entries to write")
    w = GGUFWriter(path)
    with w:
        w.add_kv("general.type", "imatrix")
        w.add_kv(KEY_DATASETS, list(datasets), ValueType.ARRAY, ValueType.STRING)
        w.add_kv(KEY_CHUNK_COUNT, int(chunk_count), ValueType.UINT32)
        w.add_kv(KEY_CHUNK_SIZE, int(chunk_size), ValueType.UINT32)
        for tname, arr in tensors:
            w.add_tensor_info(tname, _ggml_shape(arr), F32_TYPE, arr.nbytes)
        w.begin_data()
        for tname, arr in tensors:
            w.write_tensor(tname, arr)
        return w.finish()


def _ggml_shape(arr: np.ndarray) -> tuple[int, ...]:
    """ggml order (row length first) without trailing 1s, as gguf_write stores ``ggml_n_dims``."""
    ne = list(arr.shape[::-1])
    while len(ne) > 1 and ne[-1] == 1:
        ne.pop()
    return tuple(ne)
