"""GGUF's own constants (ggml's gguf.h): the magic and the value types, shared by the writer and
the reader."""

from __future__ import annotations

import enum
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"


class ValueType(enum.IntEnum):
    """enum gguf_type: the type of a key's value, or of an array's items."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# the fixed-size value types, little-endian: struct format of a scalar, numpy dtype of an array
# item (BOOL is one byte, 0 or 1)
_FIXED: dict[ValueType, tuple[str, str]] = {
    ValueType.UINT8: ("<B", "<u1"),
    ValueType.INT8: ("<b", "<i1"),
    ValueType.UINT16: ("<H", "<u2"),
    ValueType.INT16: ("<h", "<i2"),
    ValueType.UINT32: ("<I", "<u4"),
    ValueType.INT32: ("<i", "<i4"),
    ValueType.FLOAT32: ("<f", "<f4"),
    ValueType.BOOL: ("<?", "<u1"),
    ValueType.UINT64: ("<Q", "<u8"),
    ValueType.INT64: ("<q", "<i8"),
    ValueType.FLOAT64: ("<d", "<f8"),
}
STRUCT_FORMAT: dict[ValueType, str] = {t: fmt for t, (fmt, _) in _FIXED.items()}
DTYPE: dict[ValueType, np.dtype[Any]] = {t: np.dtype(dt) for t, (_, dt) in _FIXED.items()}
