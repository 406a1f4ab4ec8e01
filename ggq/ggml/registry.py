"""Registry of ggml tensor types: each a pair quantize_blocks / dequantize_blocks.

A block format works on ``(n_blocks, block_size)`` float32 arrays and ``(n_blocks, type_size)``
uint8 arrays, fully vectorised. ``quantize`` / ``dequantize`` take whole rows; a row is a whole
number of blocks, and importance weights (an imatrix column vector) apply per row position.

``quantize`` encodes with the C++ extension ``ggq._quants`` where it has the type (the same
bytes, many times faster) and with the numpy ``quantize_blocks`` otherwise; ``impl=`` picks one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Literal

import numpy as np

# (n_blocks, block_size) float32, optional (n_blocks, block_size) float32 weights -> (n_blocks, type_size) uint8
QuantizeBlocks = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]
# (n_blocks, type_size) uint8 -> (n_blocks, block_size) float32
DequantizeBlocks = Callable[[np.ndarray], np.ndarray]


class QuantError(ValueError):
    """A tensor cannot be encoded in the asked type; the message names the type and the shape."""


@dataclass(frozen=True)
class BlockFormat:
    name: str  # ggml's type name, upper case: "Q4_0", "Q4_K", "F16"
    type_id: int  # enum ggml_type
    block_size: int  # weights per block
    type_size: int  # bytes per block
    quantize_blocks: QuantizeBlocks
    dequantize_blocks: DequantizeBlocks
    # True when importance weighting uses statistics of the whole row (Q4_0..Q5_1 do, via the
    # row's mean square): quantize_blocks then also gets ``n_per_row=`` to find row boundaries.
    row_stats: bool = False

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


FORMATS: dict[str, BlockFormat] = {}


def register(fmt: BlockFormat) -> BlockFormat:
    if fmt.name in FORMATS:
        raise ValueError(f"ggml type {fmt.name} registered twice")
    FORMATS[fmt.name] = fmt
    return fmt


def get(name: str) -> BlockFormat:
    key = name.upper()
    if key not in FORMATS:
        raise QuantError(f"unknown tensor type {name!r}; known: {', '.join(sorted(FORMATS))}")
    return FORMATS[key]


Impl = Literal["auto", "native", "numpy"]


@lru_cache(maxsize=1)
def _native() -> ModuleType | None:
    """``ggq._quants``, or None when the extension is not built (numpy then encodes everything)."""
    try:
        from ggq import _quants
    except ImportError:
        return None
    return _quants


def native_types() -> frozenset[str]:
    """The types ``ggq._quants`` encodes (empty when the extension is not built)."""
    mod = _native()
    return frozenset(mod.types()) if mod is not None else frozenset()


def quantize(
    rows: np.ndarray,
    type_name: str,
    imatrix: np.ndarray | None = None,
    *,
    impl: Impl = "auto",
    n_threads: int = 1,
) -> np.ndarray:
    """Encode ``(n_rows, n_per_row)`` float32 rows; returns ``(n_rows, row_bytes)`` uint8.

    ``imatrix`` is ``(n_per_row,)``: the importance of each column, as llama.cpp's imatrix
    stores it (mean of squared activations), shared by every row.

    ``impl``: "native" (``ggq._quants``; QuantError if it lacks the type), "numpy", or "auto"
    (native where available). ``n_threads`` splits the rows of a native call across threads
    (0: all cores); the default 1 suits callers that already encode chunks in parallel.
    """
    fmt = get(type_name)
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2:
        raise QuantError(f"{fmt.name}: expected 2-D rows, got shape {rows.shape}")
    n_per_row = rows.shape[1]
    if n_per_row % fmt.block_size:
        raise QuantError(
            f"{fmt.name}: row length {n_per_row} is not a multiple of the block size {fmt.block_size}"
        )
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (n_per_row,):
            raise QuantError(f"{fmt.name}: imatrix has shape {imatrix.shape}, expected ({n_per_row},)")
    if impl not in ("auto", "native", "numpy"):
        raise QuantError(f"{fmt.name}: impl must be 'auto', 'native' or 'numpy', got {impl!r}")
    mod = None if impl == "numpy" else _native()
    if mod is not None and fmt.name in native_types():
        blocks: np.ndarray = mod.quantize(fmt.name, rows, imatrix, n_threads)
        return blocks
    if impl == "native":
        why = "is not built" if mod is None else "has no encoder for it"
        raise QuantError(f"{fmt.name}: impl='native' asked, but the extension ggq._quants {why}")
    return _quantize_numpy(fmt, rows, imatrix)


def _quantize_numpy(fmt: BlockFormat, rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    n_rows, n_per_row = rows.shape
    nb = n_per_row // fmt.block_size
    weights = None
    if imatrix is not None:
        weights = np.broadcast_to(imatrix.reshape(1, nb, fmt.block_size), (n_rows, nb, fmt.block_size))
        weights = weights.reshape(n_rows * nb, fmt.block_size)
    flat = rows.reshape(n_rows * nb, fmt.block_size)  # (n_blocks, block_size)
    if fmt.row_stats:
        blocks = fmt.quantize_blocks(flat, weights, n_per_row=n_per_row)  # type: ignore[call-arg]
    else:
        blocks = fmt.quantize_blocks(flat, weights)
    return blocks.reshape(n_rows, nb * fmt.type_size)


def dequantize(data: np.ndarray, type_name: str, n_per_row: int) -> np.ndarray:
    """Decode ``(n_rows, row_bytes)`` uint8 (or flat bytes) into ``(n_rows, n_per_row)`` float32."""
    fmt = get(type_name)
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, fmt.type_size)
    values = fmt.dequantize_blocks(raw)
    return values.reshape(-1, n_per_row)
