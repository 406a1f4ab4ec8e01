"""The legacy 32-weight block formats Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0, byte-exact with ggml.

Without an imatrix every type uses ggml's reference rounding (quantize_row_*_ref). With one,
ggml_quantize_chunk ignores it for Q8_0 but uses it for the other four: Q4_0 / Q5_0 search a
symmetric scale (make_qx_quants), Q4_1 / Q5_1 a scale and a minimum (make_qkx3_quants), both
weighing each value by ``imatrix[j] * sqrt(sigma2 + x[j]**2)``, where ``sigma2`` is the mean
square of the value's whole *row*. The block encoders therefore need the row length as well:
``quantize_blocks(x, w, n_per_row=...)``, with rows laid out consecutively in ``x``.

All arithmetic is float32 in the order ggml's C code uses (it is built without FMA), sums run
left to right, and ties in the max/min searches keep the first element, as the C loops do.
The numeric helpers here (first_absmax, safe_div, the nibble packers, ...) are shared with
iq4.py; nearest_int and seq_sum, shared with the K-quants too, are in floats.py.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from ggq.ggml.floats import fp16_bytes, fp16_field, nearest_int, seq_sum
from ggq.ggml.registry import CodeGrid, QuantError, register

F32 = np.float32
QK = 32  # weights per block, every legacy type
GROUP_MAX_EPS = F32(1e-15)  # a block whose largest |x| is below this is all zero
FLT_MAX = float(np.finfo(np.float32).max)


# ---------------------------------------------------------------- numeric helpers (float32, C order)


def roundf(v: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero), float32 in and out; the float64 ``+ 0.5`` is exact."""
    return np.copysign(np.floor(np.abs(v).astype(np.float64) + 0.5), v).astype(F32)


def trunc_to_byte(v: np.ndarray) -> np.ndarray:
    """C ``(int8_t)`` / ``(uint8_t)`` of a float: truncate to int32, keep the low byte (uint8)."""
    with np.errstate(invalid="ignore"):
        return v.astype(np.int32).astype(np.uint8)


def first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(n, k)`` -> (amax, max) ``(n,)``: the C loop ``if (amax < fabsf(v)) { amax = fabsf(v); max = v; }``.

    Both start at 0; the first element of largest magnitude wins; NaN never wins a comparison.
    """
    mag = np.abs(x)  # (n, k)
    mag = np.where(np.isnan(mag), F32(0), mag)
    idx = np.argmax(mag, axis=1)[:, None]  # first of the largest
    amax = np.take_along_axis(mag, idx, axis=1)[:, 0]
    signed = np.take_along_axis(x, idx, axis=1)[:, 0]
    return amax, np.where(amax > 0, signed, F32(0)).astype(F32)


def first_extreme(x: np.ndarray, pick: np.ufunc, initial: float) -> np.ndarray:
    """``(n, k)`` -> ``(n,)``: the running min (``pick=np.fmin``) or max (``np.fmax``) of a C loop
    with strict ``<`` / ``>``: among equal extremes (+0 and -0) the first one is kept."""
    value = pick.reduce(x, axis=1, initial=initial)  # (n,) NaN-skipping
    hit = x == value[:, None]  # (n, k)
    first = np.take_along_axis(x, np.argmax(hit, axis=1)[:, None], axis=1)[:, 0]
    return np.where(hit.any(axis=1), first, value).astype(F32)


def inverse_or_zero(d: np.ndarray) -> np.ndarray:
    """C ``d ? 1.0f/d : 0.0f`` elementwise."""
    nonzero = d != 0
    return np.where(nonzero, F32(1) / np.where(nonzero, d, F32(1)), F32(0)).astype(F32)


def safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` where ``den != 0``, 0 elsewhere (the caller masks those lanes)."""
    return num / np.where(den != 0, den, F32(1))


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """``(n, 32)`` 4-bit codes -> ``(n, 16)`` uint8: low nibble element j, high nibble j + 16."""
    q = q.astype(np.uint8)
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """``(n, 16)`` uint8 -> ``(n, 32)`` uint8 codes 0..15."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def pack_high_bits(q: np.ndarray) -> np.ndarray:
    """``(n, 32)`` 5-bit codes -> ``(n, 4)`` uint8: bit 4 of element j at bit j of a little-endian uint32."""
    return np.packbits((q.astype(np.uint8) >> 4) & 1, axis=1, bitorder="little")


def unpack_high_bits(qh: np.ndarray) -> np.ndarray:
    """``(n, 4)`` uint8 -> ``(n, 32)`` uint8: 0x10 where element j's fifth bit is set."""
    return np.unpackbits(qh, axis=1, bitorder="little") << 4


# ---------------------------------------------------------------- imatrix scale searches


def row_importance(x: np.ndarray, w: np.ndarray, n_per_row: int | None, type_name: str) -> np.ndarray:
    """``(nb, 32)`` blocks of consecutive rows -> ``(nb, 32)`` weights ``w * sqrt(sigma2 + x*x)``,
    ``sigma2`` being the mean square of the block's row (summed left to right, as ggml does)."""
    if n_per_row is None:
        raise QuantError(
            f"{type_name}: quantizing with an imatrix needs the row length (n_per_row): "
            "ggml weighs each block by the mean square of its whole row"
        )
    if n_per_row <= 0 or n_per_row % x.shape[1] or x.size % n_per_row:
        raise QuantError(
            f"{type_name}: {x.shape[0]} blocks of {x.shape[1]} do not split into rows of {n_per_row}"
        )
    rows = x.reshape(-1, n_per_row)  # (n_rows, n_per_row)
    sum_x2 = np.add.accumulate(rows * rows, axis=1)[:, -1]  # (n_rows,) sequential float32
    sigma2 = np.repeat(sum_x2 / F32(n_per_row), n_per_row // x.shape[1])  # (nb,)
    return w * np.sqrt(sigma2[:, None] + x * x)  # (nb, 32)


def make_qx_quants(x: np.ndarray, nmax: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric weighted scale search (ggml's make_qx_quants, rmse_type 1 with quant weights).

    ``(nb, k)`` values and weights -> scale ``(nb,)`` float32, codes ``(nb, k)`` uint8 in
    ``0..2*nmax-1`` (value = scale * (code - nmax)).
    """
    amax, vmax = first_absmax(x)
    empty = amax < GROUP_MAX_EPS  # (nb,)
    vmax = np.where(empty, F32(1), vmax)

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)  # (nb, k) int32
        qf = q.astype(F32)
        return q, seq_sum(weights * x * qf, axis=1), seq_sum(weights * qf * qf, axis=1)

    q, sumlx, suml2 = trial(F32(-nmax) / vmax)
    codes = q + nmax  # (nb, k)
    scale = np.where(suml2 != 0, safe_div(sumlx, suml2), F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        q, sumlx, suml2 = trial(-(F32(nmax) + F32(0.1) * F32(step)) / vmax)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)  # (nb,)
        codes = np.where(better[:, None], q + nmax, codes)
        scale = np.where(better, safe_div(sumlx, suml2), scale)
        best = np.where(better, scale * sumlx, best)
    scale = np.where(empty, F32(0), scale).astype(F32)
    return scale, np.where(empty[:, None], 0, codes).astype(np.uint8)


def make_qkx3_quants(
    x: np.ndarray, nmax: int, weights: np.ndarray, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted scale + minimum search (ggml's make_qkx3_quants with weights, least squares).

    ``(nb, k)`` values and weights -> scale ``(nb,)``, the_min ``(nb,)`` (value = scale * code -
    the_min), codes ``(nb, k)`` uint8 in ``0..nmax``.
    """
    vmin = first_extreme(x, np.fmin, np.inf)
    vmax = first_extreme(x, np.fmax, -np.inf)
    sum_w = seq_sum(weights, from_zero=False, axis=1)
    sum_x = seq_sum(weights * x, from_zero=False, axis=1)
    vmin = np.where(vmin > 0, F32(0), vmin)
    flat = vmax <= vmin  # (nb,)
    span = np.where(flat, F32(1), vmax - vmin)

    iscale = F32(nmax) / span
    scale = F32(1) / iscale
    codes = np.clip(nearest_int(iscale[:, None] * (x - vmin[:, None])), 0, nmax)  # (nb, k)
    diff = scale[:, None] * codes.astype(F32) + vmin[:, None] - x
    best_mad = seq_sum(weights * (diff * diff), axis=1)
    for step in range(nstep + 1):
        # as in C, an accepted step moves ``min`` and with it the grid of the following steps
        span = np.where(flat, F32(1), vmax - vmin)
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / span
        q = np.clip(nearest_int(iscale[:, None] * (x - vmin[:, None])), 0, nmax)  # (nb, k)
        qf = q.astype(F32)
        sum_l = seq_sum(weights * qf, axis=1)
        sum_l2 = seq_sum(weights * qf * qf, axis=1)
        sum_xl = seq_sum(weights * qf * x, axis=1)
        det = sum_w * sum_l2 - sum_l * sum_l
        solvable = det > 0
        this_scale = safe_div(sum_w * sum_xl - sum_x * sum_l, det)
        this_min = safe_div(sum_l2 * sum_x - sum_l * sum_xl, det)
        clamp = this_min > 0
        this_min = np.where(clamp, F32(0), this_min)
        this_scale = np.where(clamp, safe_div(sum_xl, sum_l2), this_scale)
        diff = this_scale[:, None] * qf + this_min[:, None] - x
        mad = seq_sum(weights * (diff * diff), axis=1)
        better = solvable & (mad < best_mad) & ~flat  # (nb,)
        codes = np.where(better[:, None], q, codes)
        best_mad = np.where(better, mad, best_mad)
        scale = np.where(better, this_scale, scale)
        vmin = np.where(better, this_min, vmin)
    scale = np.where(flat, F32(0), scale).astype(F32)
    return scale, (-vmin).astype(F32), np.where(flat[:, None], 0, codes).astype(np.uint8)


# ---------------------------------------------------------------- reference rounding (no imatrix)


def _symmetric_ref(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """quantize_row_q4_0_ref / q5_0_ref: ``d = max / -nmax``, code = min(2nmax-1, (int8)(x/d + nmax + .5))."""
    _, vmax = first_absmax(x)
    d = vmax / F32(-nmax)  # (nb,) -0.0 for an all-zero block, as in C
    inv = inverse_or_zero(d)
    codes = trunc_to_byte(x * inv[:, None] + F32(nmax + 0.5))  # (nb, 32)
    return d, np.minimum(codes.view(np.int8), 2 * nmax - 1).view(np.uint8)


def _affine_ref(x: np.ndarray, nmax: int, clamp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_row_q4_1_ref / q5_1_ref: ``d = (max - min) / nmax``, code = (int)((x - min)/d + .5)."""
    vmin = first_extreme(x, np.fmin, FLT_MAX)
    vmax = first_extreme(x, np.fmax, -FLT_MAX)
    d = (vmax - vmin) / F32(nmax)  # (nb,)
    inv = inverse_or_zero(d)
    codes = trunc_to_byte((x - vmin[:, None]) * inv[:, None] + F32(0.5))  # (nb, 32)
    if clamp:  # q4_1 clamps with MIN(15, (int8_t)...), q5_1 does not clamp
        codes = np.minimum(codes.view(np.int8), nmax).view(np.uint8)
    return d, vmin, codes


def _affine_codes(
    x: np.ndarray, w: np.ndarray | None, n_per_row: int | None, type_name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1 / Q5_1: ``(d, m, codes)`` with value = d * code + m; the reference rounding without an
    importance, ggml's qkx3 search (the imatrix path) with one."""
    nmax = 15 if type_name == "Q4_1" else 31
    if w is None:  # q4_1 clamps the codes with MIN(15, (int8_t)...), q5_1 does not
        return _affine_ref(x, nmax, clamp=type_name == "Q4_1")
    d, the_min, codes = make_qkx3_quants(x, nmax, row_importance(x, w, n_per_row, type_name), -0.9, 0.05, 36)
    return d, -the_min, codes


# ---------------------------------------------------------------- the formats


def quantize_q4_0(x: np.ndarray, w: np.ndarray | None = None, n_per_row: int | None = None) -> np.ndarray:
    """``(nb, 32)`` -> ``(nb, 18)``: fp16 d, 16 bytes of nibbles; value = d * (code - 8)."""
    if w is None:
        d, codes = _symmetric_ref(x, 8)
    else:
        d, codes = make_qx_quants(x, 8, row_importance(x, w, n_per_row, "Q4_0"))
    return np.concatenate([fp16_bytes(d), pack_nibbles(codes)], axis=1)


def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    d = fp16_field(raw, 0)  # (nb,)
    codes = unpack_nibbles(raw[:, 2:18]).astype(np.int32) - 8  # (nb, 32)
    return codes.astype(F32) * d[:, None]


def quantize_q4_1(x: np.ndarray, w: np.ndarray | None = None, n_per_row: int | None = None) -> np.ndarray:
    """``(nb, 32)`` -> ``(nb, 20)``: fp16 d, fp16 m, 16 bytes of nibbles; value = d * code + m."""
    d, m, codes = _affine_codes(x, w, n_per_row, "Q4_1")
    return np.concatenate([fp16_bytes(d), fp16_bytes(m), pack_nibbles(codes)], axis=1)


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    d, m = fp16_field(raw, 0), fp16_field(raw, 2)  # (nb,)
    codes = unpack_nibbles(raw[:, 4:20]).astype(F32)  # (nb, 32)
    return codes * d[:, None] + m[:, None]


def quantize_q5_0(x: np.ndarray, w: np.ndarray | None = None, n_per_row: int | None = None) -> np.ndarray:
    """``(nb, 32)`` -> ``(nb, 22)``: fp16 d, 4 bytes of fifth bits, 16 bytes of nibbles; value = d * (code - 16)."""
    if w is None:
        d, codes = _symmetric_ref(x, 16)
    else:
        d, codes = make_qx_quants(x, 16, row_importance(x, w, n_per_row, "Q5_0"))
    return np.concatenate([fp16_bytes(d), pack_high_bits(codes), pack_nibbles(codes)], axis=1)


def dequantize_q5_0(raw: np.ndarray) -> np.ndarray:
    d = fp16_field(raw, 0)  # (nb,)
    codes = unpack_nibbles(raw[:, 6:22]) | unpack_high_bits(raw[:, 2:6])  # (nb, 32)
    return (codes.astype(np.int32) - 16).astype(F32) * d[:, None]


def quantize_q5_1(x: np.ndarray, w: np.ndarray | None = None, n_per_row: int | None = None) -> np.ndarray:
    """``(nb, 32)`` -> ``(nb, 24)``: fp16 d, fp16 m, 4 bytes of fifth bits, 16 of nibbles; value = d * code + m."""
    d, m, codes = _affine_codes(x, w, n_per_row, "Q5_1")
    return np.concatenate([fp16_bytes(d), fp16_bytes(m), pack_high_bits(codes), pack_nibbles(codes)], axis=1)


def dequantize_q5_1(raw: np.ndarray) -> np.ndarray:
    d, m = fp16_field(raw, 0), fp16_field(raw, 2)  # (nb,)
    codes = (unpack_nibbles(raw[:, 8:24]) | unpack_high_bits(raw[:, 4:8])).astype(F32)  # (nb, 32)
    return codes * d[:, None] + m[:, None]


def quantize_q8_0(x: np.ndarray, w: np.ndarray | None = None, n_per_row: int | None = None) -> np.ndarray:
    """``(nb, 32)`` -> ``(nb, 34)``: fp16 d, 32 int8; value = d * q. ggml ignores the imatrix here."""
    amax = np.max(np.abs(x), axis=1, initial=F32(0))  # (nb,)
    d = amax / F32(127)
    inv = inverse_or_zero(d)
    q = trunc_to_byte(roundf(x * inv[:, None]))  # (nb, 32) int8 bit patterns
    return np.concatenate([fp16_bytes(d), q], axis=1)


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    d = fp16_field(raw, 0)  # (nb,)
    return raw[:, 2:34].view(np.int8).astype(F32) * d[:, None]


# ---------------------------------------------------------------- codes under fixed scales


def _block_levels(raw: np.ndarray, unit: np.ndarray, has_min: bool) -> np.ndarray:
    """``(rows, type_size)`` -> ``(1, rows, n_codes)``: code c decodes to ``unit[c] * d (+ m)``."""
    levels = (unit * fp16_field(raw, 0)[:, None])[None]  # (1, rows, n_codes)
    if has_min:
        levels = levels + fp16_field(raw, 2)[None, :, None]
    return levels


def _pack_codes(
    raw: np.ndarray, codes: np.ndarray, has_min: bool, code_bytes: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    out = raw.copy()
    out[:, 4 if has_min else 2 :] = code_bytes(codes)  # after fp16 d (and fp16 m)
    return out


def block32_grid(unit: np.ndarray, has_min: bool, code_bytes: Callable[[np.ndarray], np.ndarray]) -> CodeGrid:
    """The code grid of a 32-weight block laid out as fp16 ``d`` (fp16 ``m``), then the code bytes
    ``code_bytes(codes (rows, 32)) -> (rows, k)``; code c decodes to ``unit[c] * d`` (``+ m``)."""
    return CodeGrid(
        unit,
        QK,
        functools.partial(_block_levels, unit=unit, has_min=has_min),
        functools.partial(_pack_codes, has_min=has_min, code_bytes=code_bytes),
    )


def _five_bits(codes: np.ndarray) -> np.ndarray:
    return np.concatenate([pack_high_bits(codes), pack_nibbles(codes)], axis=1)


def _int8(codes: np.ndarray) -> np.ndarray:
    return (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)  # stored code c is int8 c - 128


def _range(lo: int, hi: int) -> np.ndarray:
    return np.arange(lo, hi + 1, dtype=F32)


# name, encoder, decoder, whole-row imatrix statistics, code values, fp16 m after d, code bytes
_FORMATS = (
    ("Q4_0", quantize_q4_0, dequantize_q4_0, True, _range(-8, 7), False, pack_nibbles),
    ("Q4_1", quantize_q4_1, dequantize_q4_1, True, _range(0, 15), True, pack_nibbles),
    ("Q5_0", quantize_q5_0, dequantize_q5_0, True, _range(-16, 15), False, _five_bits),
    ("Q5_1", quantize_q5_1, dequantize_q5_1, True, _range(0, 31), True, _five_bits),
    ("Q8_0", quantize_q8_0, dequantize_q8_0, False, _range(-128, 127), False, _int8),
)
for _name, _quantize, _dequantize, _row_stats, _unit, _has_min, _code_bytes in _FORMATS:
    register(
        _name, _quantize, _dequantize, row_stats=_row_stats, grid=block32_grid(_unit, _has_min, _code_bytes)
    )
