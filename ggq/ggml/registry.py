"""ggml's type table, and the registry of the types ggq encodes: each a pair quantize_blocks /
dequantize_blocks.

``GGML_TYPES`` is the one place ggq writes down a ggml type's id, block size, bytes per block
and float-ness: every type of the pinned ggml (``enum ggml_type``, ``type_traits`` in ggml.c),
encodable here or not, so that the reader sizes any file's tensors and the planner sizes a
plan without an encoder. ``FORMATS`` holds the types a family module registers an encoder for.

A block format works on ``(n_blocks, block_size)`` float32 arrays and ``(n_blocks, type_size)``
uint8 arrays, fully vectorised. ``quantize`` / ``dequantize`` take whole rows; a row is a whole
number of blocks, and importance weights (an imatrix column vector) apply per row position.

``quantize`` encodes with the C++ extension ``ggq._quants`` where it has the type (the same
bytes, many times faster) and with the numpy ``quantize_blocks`` otherwise; ``impl=`` picks one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass
from functools import lru_cache
from types import ModuleType
from typing import Literal

import numpy as np

from ggq.errors import GGQError

# (n_blocks, block_size) float32, optional (n_blocks, block_size) float32 weights -> (n_blocks, type_size) uint8
QuantizeBlocks = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]
# (n_blocks, type_size) uint8 -> (n_blocks, block_size) float32
DequantizeBlocks = Callable[[np.ndarray], np.ndarray]


class QuantError(GGQError, ValueError):
    """A tensor cannot be encoded in the asked type; the message names the type and the shape."""


@dataclass(frozen=True)
class GGMLType:
    name: str  # ggml's type name, upper case: "Q4_0", "Q4_K", "F16"
    type_id: int  # enum ggml_type, as a GGUF tensor info stores it
    block_size: int  # weights per block
    type_size: int  # bytes per block
    is_float: bool = False  # stored as plain floats (never quantized by a recipe)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def nbytes(self, shape: Sequence[int]) -> int:
        """Bytes of a tensor of ggml ``shape`` (ne[0], the row length, first) in this type."""
        return math.prod(shape) // self.block_size * self.type_size


# enum ggml_type and ggml.c's type_traits at the pinned commit (ids 4, 5, 31..33, 36..38 are
# removed types); tests/test_ggml_types.py holds it against ggml, gguf-py and ggq._quants
GGML_TYPES: dict[str, GGMLType] = {
    t.name: t
    for t in (
        GGMLType("F32", 0, 1, 4, is_float=True),
        GGMLType("F16", 1, 1, 2, is_float=True),
        GGMLType("Q4_0", 2, 32, 18),
        GGMLType("Q4_1", 3, 32, 20),
        GGMLType("Q5_0", 6, 32, 22),
        GGMLType("Q5_1", 7, 32, 24),
        GGMLType("Q8_0", 8, 32, 34),
        GGMLType("Q8_1", 9, 32, 36),
        GGMLType("Q2_K", 10, 256, 84),
        GGMLType("Q3_K", 11, 256, 110),
        GGMLType("Q4_K", 12, 256, 144),
        GGMLType("Q5_K", 13, 256, 176),
        GGMLType("Q6_K", 14, 256, 210),
        GGMLType("Q8_K", 15, 256, 292),
        GGMLType("IQ2_XXS", 16, 256, 66),
        GGMLType("IQ2_XS", 17, 256, 74),
        GGMLType("IQ3_XXS", 18, 256, 98),
        GGMLType("IQ1_S", 19, 256, 50),
        GGMLType("IQ4_NL", 20, 32, 18),
        GGMLType("IQ3_S", 21, 256, 110),
        GGMLType("IQ2_S", 22, 256, 82),
        GGMLType("IQ4_XS", 23, 256, 136),
        GGMLType("I8", 24, 1, 1),
        GGMLType("I16", 25, 1, 2),
        GGMLType("I32", 26, 1, 4),
        GGMLType("I64", 27, 1, 8),
        GGMLType("F64", 28, 1, 8, is_float=True),
        GGMLType("IQ1_M", 29, 256, 56),
        GGMLType("BF16", 30, 1, 2, is_float=True),
        GGMLType("TQ1_0", 34, 256, 54),
        GGMLType("TQ2_0", 35, 256, 66),
        GGMLType("MXFP4", 39, 32, 17),
        GGMLType("NVFP4", 40, 64, 36),
        GGMLType("Q1_0", 41, 128, 18),
        GGMLType("Q2_0", 42, 64, 18),
    )
}
_BY_ID = {t.type_id: t for t in GGML_TYPES.values()}


def ggml_type(name: str) -> GGMLType:
    """The ggml type called ``name`` (any case), encodable by ggq or not."""
    key = name.upper()
    if key not in GGML_TYPES:
        raise QuantError(f"unknown ggml type {name!r}; known: {', '.join(GGML_TYPES)}")
    return GGML_TYPES[key]


def type_by_id(type_id: int) -> GGMLType:
    """The ggml type whose ``enum ggml_type`` value is ``type_id``."""
    if type_id not in _BY_ID:
        raise QuantError(f"unknown ggml type id {type_id}")
    return _BY_ID[type_id]


def nbytes(type_name: str, shape: Sequence[int]) -> int:
    """Bytes of a tensor of ggml ``shape`` in type ``type_name`` (planning needs no encoder)."""
    return ggml_type(type_name).nbytes(shape)


def is_float(type_name: str) -> bool:
    """True for the plain float types (F32, F16, BF16, F64): no blocks, no imatrix."""
    return ggml_type(type_name).is_float


@dataclass(frozen=True)
class CodeGrid:
    """A block type as a solver sees it: each weight one code on a grid fixed by the block's
    scales. Fitting the scales is the type's own encoder (``quantize``), decoding ``dequantize``;
    between the two, a solver reads what every code decodes to and packs codes of its choosing."""

    unit: np.ndarray  # (n_codes,) float32, ascending: code c is unit[c] steps of its sub-block
    sub: int  # weights per sub-block: one step (and offset) each
    # (rows, type_size) blocks -> (n_sub, rows, n_codes) float32: the exact value each code of
    # each sub-block decodes to, as ggml's dequantization computes it
    levels: Callable[[np.ndarray], np.ndarray]
    # (rows, type_size) blocks, (rows, block_size) uint8 codes -> the blocks with those codes
    # under the blocks' own scales
    pack: Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class BlockFormat(GGMLType):
    """A ggml type ggq encodes and decodes: the type table's entry, with its coders."""

    _: KW_ONLY
    quantize_blocks: QuantizeBlocks
    dequantize_blocks: DequantizeBlocks
    # True when importance weighting uses statistics of the whole row (Q4_0..Q5_1 do, via the
    # row's mean square): quantize_blocks then also gets ``n_per_row=`` to find row boundaries.
    row_stats: bool = False
    grid: CodeGrid | None = None  # None: no solver chooses this type's codes (floats, IQ4_XS)


FORMATS: dict[str, BlockFormat] = {}


def register(
    name: str,
    quantize_blocks: QuantizeBlocks,
    dequantize_blocks: DequantizeBlocks,
    *,
    row_stats: bool = False,
    grid: CodeGrid | None = None,
) -> BlockFormat:
    """Register the encoder and decoder of the ggml type ``name`` (its sizes from GGML_TYPES)."""
    if name in FORMATS:
        raise ValueError(f"ggml type {name} registered twice")
    t = ggml_type(name)
    fmt = BlockFormat(
        t.name,
        t.type_id,
        t.block_size,
        t.type_size,
        t.is_float,
        quantize_blocks=quantize_blocks,
        dequantize_blocks=dequantize_blocks,
        row_stats=row_stats,
        grid=grid,
    )
    FORMATS[name] = fmt
    return fmt


def float_types() -> tuple[str, ...]:
    """The float types ggq writes, in registration order: ("F32", "F16", "BF16")."""
    return tuple(name for name, fmt in FORMATS.items() if fmt.is_float)


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
