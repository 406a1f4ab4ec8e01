"""ggml itself, at the pinned commit, as the reference for ggq's block encoders and decoders.

Calls ``ggml_quantize_chunk`` and the type's ``to_float`` from the libggml-base that the native
build installed (ggq/lib), through ctypes: the code under test never runs on this side.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import numpy as np

from ggq import native


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


@lru_cache(maxsize=1)
def lib() -> ctypes.CDLL:
    native.load()  # loads ggq/lib into the process first
    ggml = ctypes.CDLL(str(native.lib_dir() / "libggml-base.so"))
    ggml.ggml_quantize_chunk.restype = ctypes.c_size_t
    ggml.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    ggml.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    ggml.ggml_get_type_traits.argtypes = [ctypes.c_int]
    ggml.ggml_row_size.restype = ctypes.c_size_t
    ggml.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return ggml


def traits(type_id: int) -> _TypeTraits:
    return lib().ggml_get_type_traits(type_id).contents


def quantize(rows: np.ndarray, type_id: int, imatrix: np.ndarray | None = None) -> np.ndarray:
    """ggml_quantize_chunk over ``(n_rows, n_per_row)`` float32 rows -> ``(n_rows, row_bytes)`` uint8."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n_rows, n_per_row = rows.shape
    row_bytes = lib().ggml_row_size(type_id, n_per_row)
    out = np.zeros((n_rows, row_bytes), dtype=np.uint8)
    imat = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        imat = imatrix.ctypes.data
    written = lib().ggml_quantize_chunk(
        type_id, rows.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, imat
    )
    assert written == out.nbytes
    return out


def dequantize(data: np.ndarray, type_id: int, n_per_row: int) -> np.ndarray:
    """The type's ggml to_float over ``(n_rows, row_bytes)`` uint8 -> float32."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    n = data.nbytes // lib().ggml_row_size(type_id, n_per_row) * n_per_row
    out = np.empty(n, dtype=np.float32)
    to_float = _TO_FLOAT(traits(type_id).to_float)
    to_float(data.ctypes.data, out.ctypes.data, n)
    return out.reshape(-1, n_per_row)
