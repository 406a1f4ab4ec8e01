"""F32, F16 and BF16: one value per block, converted exactly as ggml converts them.

* F16 is IEEE binary16 with round-to-nearest-even (ggml_compute_fp32_to_fp16); every NaN becomes
  the quiet NaN 0x7E00 with the input's sign bit. Decoding quiets signalling NaNs, as ggml's
  float multiply does.
* BF16 is the upper half of the float32 bit pattern, rounded to nearest even
  (ggml_compute_fp32_to_bf16); a NaN keeps its upper bits and gets the quiet bit 0x40 forced on.

The fp16 helpers here are shared by every block format that stores an fp16 scale, and the C
float32 arithmetic (``nearest_int``, ``seq_sum``) by every family's scale searches.
"""

from __future__ import annotations

import numpy as np

from ggq.ggml.registry import register


def fp32_to_fp16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values -> uint16 binary16 bit patterns, as GGML_FP32_TO_FP16 (same shape)."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        bits = x.astype(np.float16).view(np.uint16)
    sign = (x.view(np.uint32) >> 16).astype(np.uint16) & np.uint16(0x8000)
    return np.where(np.isnan(x), sign | np.uint16(0x7E00), bits).astype(np.uint16)


def fp16_bits_to_fp32(h: np.ndarray) -> np.ndarray:
    """uint16 binary16 bit patterns -> float32, as GGML_FP16_TO_FP32 (same shape)."""
    h = np.asarray(h, dtype=np.uint16)
    values = h.view(np.float16).astype(np.float32)
    # NaN: sign | all-ones exponent | mantissa << 13, with the quiet bit set
    nan_bits = (
        ((h.astype(np.uint32) & 0x8000) << 16)
        | np.uint32(0x7FC00000)
        | ((h.astype(np.uint32) & 0x03FF) << 13)
    )
    is_nan = (h & 0x7FFF) > 0x7C00
    return np.where(is_nan, nan_bits.view(np.float32), values)


def fp16_bytes(values: np.ndarray) -> np.ndarray:
    """``(n,)`` float32 -> ``(n, 2)`` uint8: the little-endian fp16 field of a block."""
    return fp32_to_fp16_bits(values).astype("<u2").view(np.uint8).reshape(-1, 2)


def fp16_field(raw: np.ndarray, offset: int) -> np.ndarray:
    """The little-endian fp16 at byte ``offset`` of each ``(n, type_size)`` block -> ``(n,)`` float32."""
    h = raw[:, offset].astype(np.uint16) | (raw[:, offset + 1].astype(np.uint16) << 8)
    return fp16_bits_to_fp32(h)


_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: adding it rounds a float32 to an integer, half to even


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: add 1.5 * 2**23 in float32 and read the low mantissa bits -> int32
    (round half to even for |v| < 2**22)."""
    return ((np.asarray(v, dtype=np.float32) + _MAGIC).view(np.int32) & 0x007FFFFF) - 0x00400000


def seq_sum(a: np.ndarray, *, axis: int, from_zero: bool = True) -> np.ndarray:
    """float32 sum along ``axis`` in index order, as the C loop ``s = 0; for j: s += a[j]`` (never
    numpy's pairwise sum). ``from_zero=False`` starts from the first element instead
    (``s = a[0]; for j >= 1``), which differs only in the sign of an all-zero sum."""
    a = np.moveaxis(a, axis, 0)
    total = a[0] + np.float32(0) if from_zero else a[0].astype(np.float32)
    for j in range(1, a.shape[0]):
        total += a[j]
    return total


def fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values -> uint16 bfloat16 bit patterns, as ggml_compute_fp32_to_bf16 (same shape)."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32)
    is_nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    # no uint32 overflow: the largest non-NaN pattern is 0xFF800000
    rounded = (u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16
    quieted = (u >> 16) | np.uint32(64)
    return np.where(is_nan, quieted, rounded).astype(np.uint16)


def bf16_bits_to_fp32(h: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact: the low 16 bits are zero)."""
    return (np.asarray(h, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def quantize_f32(x: np.ndarray, w: np.ndarray | None = None, n_per_row: int | None = None) -> np.ndarray:
    """``(n, 1)`` float32 -> ``(n, 4)`` uint8, little-endian; ``w`` and ``n_per_row`` are unused, as in ggml."""
    return np.ascontiguousarray(x, dtype="<f4").view(np.uint8).reshape(-1, 4)


def dequantize_f32(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw, dtype=np.uint8).view("<f4").astype(np.float32).reshape(-1, 1)


def quantize_f16(x: np.ndarray, w: np.ndarray | None = None, n_per_row: int | None = None) -> np.ndarray:
    """``(n, 1)`` float32 -> ``(n, 2)`` uint8; ``w`` and ``n_per_row`` are unused, as in ggml."""
    return fp16_bytes(x.reshape(-1))


def dequantize_f16(raw: np.ndarray) -> np.ndarray:
    return fp16_field(raw, 0).reshape(-1, 1)


def quantize_bf16(x: np.ndarray, w: np.ndarray | None = None, n_per_row: int | None = None) -> np.ndarray:
    """``(n, 1)`` float32 -> ``(n, 2)`` uint8; ``w`` and ``n_per_row`` are unused, as in ggml."""
    return fp32_to_bf16_bits(x.reshape(-1)).astype("<u2").view(np.uint8).reshape(-1, 2)


def dequantize_bf16(raw: np.ndarray) -> np.ndarray:
    h = raw[:, 0].astype(np.uint16) | (raw[:, 1].astype(np.uint16) << 8)  # (n,)
    return bf16_bits_to_fp32(h).reshape(-1, 1)


register("F32", quantize_f32, dequantize_f32)
register("F16", quantize_f16, dequantize_f16)
register("BF16", quantize_bf16, dequantize_bf16)
