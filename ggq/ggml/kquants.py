"""ggml's K-quants Q2_K..Q6_K (super-blocks of 256): byte-exact numpy encoders and decoders.

Each encoder reproduces llama.cpp's ``quantize_q{2..6}_K`` at the pinned commit bit for bit:
without importance weights the ``quantize_row_q*_K_ref`` path, with them the
``quantize_row_q*_K_impl`` path. ggml-quants.c is compiled without FMA, so float32 numpy
arithmetic in the same operation order gives the same floats. Three rules make that hold:

* every operation stays in float32 (constants are ``np.float32``; ``x * y * z`` is ``(x * y) * z``);
* sums that C accumulates in a loop are accumulated here position by position (``floats.seq_sum``),
  never with numpy's pairwise ``np.sum``;
* rounding is C's ``nearest_int`` (the ``12582912.f`` trick: round half to even), and fp16 is
  round-to-nearest-even (``astype(np.float16)``), re-read as float32 where C requantizes.

Everything is vectorised over super-blocks; the Python loops run over the fixed positions of a
sub-block, the sub-blocks of a super-block, or a search's candidate scales.

The encoding is split in three steps so that a GPTQ-style solver can reuse the middle one:

* ``choose_scales(type, x, w)`` -> :class:`KScales` (fp16 ``d``/``dmin``, the packed 4/6/8-bit
  sub-block scales and mins, and the codes of the scale search for sub-blocks whose step is 0);
* ``encode(type, x, scales)`` -> ``(nb, 256)`` uint8 codes of any values under those scales
  (element-wise: ``step_offset`` gives each sub-block's step and offset);
* ``pack(type, codes, scales)`` -> ``(nb, type_size)`` uint8 blocks.

``unpack`` / ``decode`` are the inverses; ``quantize_blocks`` / ``dequantize_blocks`` of each
registered :class:`BlockFormat` are the compositions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ggq.ggml.floats import nearest_int, seq_sum
from ggq.ggml.registry import CodeGrid, QuantError, ggml_type, register

QK_K = 256

F32 = np.float32
_GROUP_MAX_EPS = F32(1e-15)
_CHUNK = 1024  # super-blocks encoded together: large enough to vectorise, small enough for cache


# ----------------------------------------------------------------------------- float32 helpers


def _seq_max(a: np.ndarray) -> np.ndarray:
    """``(n, N) -> (N,)``: ``m = 0; for i: if (a[i] > m) m = a[i];``"""
    m = np.zeros(a.shape[1:], np.float32)
    for i in range(a.shape[0]):
        m = np.where(a[i] > m, a[i], m)
    return m


def _seq_absmax(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(n, N) -> (amax, signed value at amax)``, first maximum wins (C's strict ``>``)."""
    amax = np.zeros(a.shape[1:], np.float32)
    vmax = np.zeros(a.shape[1:], np.float32)
    for i in range(a.shape[0]):
        take = np.abs(a[i]) > amax
        amax = np.where(take, np.abs(a[i]), amax)
        vmax = np.where(take, a[i], vmax)
    return amax, vmax


def _groups(a: np.ndarray, n: int) -> np.ndarray:
    """``(nb, 256)`` -> position-major ``(n, nb * 256 // n)``: column g is group g's n values.

    The searches keep the group axis innermost, so that C's per-position loops run over
    contiguous rows.
    """
    return np.ascontiguousarray(a.reshape(-1, n).T)


def _to_f16(v: np.ndarray) -> np.ndarray:
    """``GGML_FP32_TO_FP16``: round to nearest even."""
    return np.asarray(v, dtype=np.float32).astype(np.float16)


# ----------------------------------------------------------------------------- scale searches


def make_qx_quants(x: np.ndarray, nmax: int, w: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric weighted scale search (ggml ``make_qx_quants``, rmse_type 1).

    ``x``: ``(n, N)`` float32, N groups of n values (position-major, see ``_groups``);
    ``w``: same shape, or None for ``w = x*x``.
    Returns ``(scale (N,), L (n, N) int32 in [0, 2*nmax))``; all-zero groups give 0 and L = 0.
    """
    if w is None:
        w = x * x  # (n, N)
    amax, vmax = _seq_absmax(x)  # (N,)
    zero = amax < _GROUP_MAX_EPS
    vmax = np.where(zero, F32(1), vmax)
    wx = w * x  # (n, N)

    def candidate(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        li = np.clip(nearest_int(iscale * x), -nmax, nmax - 1)  # (n, N)
        lf = li.astype(np.float32)
        return li, seq_sum(wx * lf, axis=0), seq_sum(w * lf * lf, axis=0)

    li, sumlx, suml2 = candidate(F32(-nmax) / vmax)
    L = li + nmax  # (n, N)
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, F32(1)), F32(0))  # (N,)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        li, sumlx, suml2 = candidate(-(F32(nmax) + F32(0.1) * F32(step)) / vmax)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(better, li + nmax, L)
        scale = np.where(better, sumlx / np.where(better, suml2, F32(1)), scale)
        best = np.where(better, scale * sumlx, best)
    return np.where(zero, F32(0), scale), np.where(zero, 0, L)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml ``make_q3_quants`` with do_rmse: symmetric, weights ``x*x``, then up to 5
    coordinate-descent passes. ``x``: ``(n, N)``; returns ``(scale (N,), L (n, N) in [0, 2*nmax))``.
    """
    amax, vmax = _seq_absmax(x)  # (N,)
    zero = amax < _GROUP_MAX_EPS
    vmax = np.where(zero, F32(1), vmax)
    w = x * x  # (n, N)
    wx = w * x  # (n, N)
    L = np.clip(nearest_int((F32(-nmax) / vmax) * x), -nmax, nmax - 1)  # (n, N) int32
    lf = L.astype(np.float32)
    sumlx = seq_sum(wx * lf, axis=0)  # (N,)
    suml2 = seq_sum(w * lf * lf, axis=0)
    for _ in range(5):  # a group whose pass changed nothing would change nothing again
        for i in range(x.shape[0]):
            li = L[i].astype(np.float32)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            live = slx > 0
            new = np.clip(nearest_int(x[i] * sl2 / np.where(live, slx, F32(1))), -nmax, nmax - 1)
            nf = new.astype(np.float32)
            slx = slx + wx[i] * nf
            sl2 = sl2 + w[i] * nf * nf
            take = live & (new != L[i]) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[i] = np.where(take, new, L[i])
            sumlx = np.where(take, slx, sumlx)
            suml2 = np.where(take, sl2, suml2)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F32(1)), F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, 0, L + nmax)


def make_qkx_quants(
    x: np.ndarray,
    w: np.ndarray,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric (scale, min) weighted search: ggml ``make_qkx2_quants`` / ``make_qkx3_quants``
    (the same steps once the weights are given). ``x``, ``w``: ``(n, N)`` position-major.

    Returns ``(scale (N,), the_min (N,) >= 0, L (n, N) int32 in [0, nmax])``;
    x ~ scale * L - the_min.
    """
    lo = x[0].copy()  # (N,)
    hi = x[0].copy()
    for i in range(1, x.shape[0]):
        lo = np.where(x[i] < lo, x[i], lo)
        hi = np.where(x[i] > hi, x[i], hi)
    sum_w = seq_sum(w, from_zero=False, axis=0)  # (N,)
    sum_x = seq_sum(w * x, from_zero=False, axis=0)
    lo = np.where(lo > 0, F32(0), lo)
    flat = hi == lo

    def error(scale: np.ndarray, mn: np.ndarray, lf: np.ndarray) -> np.ndarray:
        diff = scale * lf + mn - x  # (n, N)
        diff = np.abs(diff) if use_mad else diff * diff
        return seq_sum(w * diff, axis=0)

    iscale = F32(nmax) / np.where(flat, F32(1), hi - lo)
    L = np.clip(nearest_int(iscale * (x - lo)), 0, nmax)  # (n, N)
    scale = F32(1) / iscale
    best = error(scale, lo, L.astype(np.float32))
    for step in range(nstep + 1):
        # C moves ``min`` to the best candidate's min as it goes; later candidates start there
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / np.where(flat, F32(1), hi - lo)
        laux = np.clip(nearest_int(iscale * (x - lo)), 0, nmax)  # (n, N)
        lf = laux.astype(np.float32)
        wl = w * lf
        sum_l = seq_sum(wl, axis=0)
        sum_l2 = seq_sum(wl * lf, axis=0)
        sum_xl = seq_sum(wl * x, axis=0)
        det = sum_w * sum_l2 - sum_l * sum_l
        live = det > 0
        det = np.where(live, det, F32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clamp = this_min > 0
        this_min = np.where(clamp, F32(0), this_min)
        this_scale = np.where(clamp, sum_xl / np.where(clamp, sum_l2, F32(1)), this_scale)
        cur = error(this_scale, this_min, lf)
        better = live & (cur < best) & ~flat
        L = np.where(better, laux, L)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        lo = np.where(better, this_min, lo)
    return np.where(flat, F32(0), scale), -lo, np.where(flat, 0, L)


def make_qp_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml ``make_qp_quants``: quantize non-negative ``x (n, N)`` to ``[0, nmax]`` with weights
    ``w (n, N)`` (a scale search, then up to 5 coordinate-descent passes).

    Returns ``(scale (N,), L (n, N) int32)``; L holds what C stores in its uint8 array.
    """
    vmax = _seq_max(x)  # (N,)  C: max = MAX(max, x[i]) from 0
    zero = vmax < _GROUP_MAX_EPS
    vmax = np.where(zero, F32(1), vmax)

    def mse(scale: np.ndarray, lf: np.ndarray) -> np.ndarray:
        diff = x - scale * lf  # (n, N)
        return seq_sum(w * diff * diff, axis=0)

    iscale = F32(nmax) / vmax
    first = nearest_int(iscale * x) & 0xFF  # (n, N) as stored in uint8
    best = mse(F32(1) / iscale, first.astype(np.float32))
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (F32(0.1) * F32(step) + F32(nmax)) / vmax
        li = np.minimum(nmax, nearest_int(iscale_is * x))
        cur = mse(F32(1) / iscale_is, li.astype(np.float32))
        better = cur < best
        best = np.where(better, cur, best)
        iscale = np.where(better, iscale_is, iscale)
    li = np.minimum(nmax, nearest_int(iscale * x))  # (n, N)
    lf = li.astype(np.float32)
    wx = w * x
    sumlx = seq_sum(wx * lf, axis=0)  # (N,)
    suml2 = seq_sum(w * lf * lf, axis=0)
    L = li & 0xFF
    for _ in range(5):
        for i in range(x.shape[0]):
            cur_l = L[i].astype(np.float32)
            slx = sumlx - wx[i] * cur_l
            sl2 = suml2 - w[i] * cur_l * cur_l
            live = (slx > 0) & (sl2 > 0)
            new = np.minimum(nmax, nearest_int(x[i] * sl2 / np.where(live, slx, F32(1))))
            nf = new.astype(np.float32)
            slx = slx + wx[i] * nf
            sl2 = sl2 + w[i] * nf * nf
            take = live & (new != L[i]) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[i] = np.where(take, new & 0xFF, L[i])
            sumlx = np.where(take, slx, sumlx)
            suml2 = np.where(take, sl2, suml2)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F32(1)), F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, 0, L)


# ----------------------------------------------------------------------------- scales


@dataclass(frozen=True)
class KScales:
    """The super-block scales chosen for ``nb`` super-blocks of one K-quant type.

    ``packed`` is the block's scales field exactly as stored (Q2_K: 16 bytes ``sc | m << 4``;
    Q3_K: 12 bytes of 6-bit scales; Q4_K/Q5_K: 12 bytes of 6-bit scales and mins; Q6_K: 16 int8).
    ``fallback`` holds the codes that ggml keeps where a sub-block's step ``d * sc`` is 0 (the
    codes of the scale search); any codes decode the same there.
    """

    d: np.ndarray  # (nb,) float16 super-block scale
    dmin: np.ndarray  # (nb,) float16 super-block min scale (zeros for Q3_K / Q6_K)
    packed: np.ndarray  # (nb, n_scale_bytes) uint8
    fallback: np.ndarray  # (nb, 256) uint8 codes


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K 12-byte scales from ``(nb, 8)`` scales and mins (as C's uint8 values)."""
    ls = ls.astype(np.int32)
    lm = lm.astype(np.int32)
    out = np.zeros((ls.shape[0], 12), np.int32)  # (nb, 12)
    out[:, 0:4] = ls[:, 0:4]
    out[:, 4:8] = lm[:, 0:4]
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    out[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    out[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return (out & 0xFF).astype(np.uint8)


def _unpack_scales_k4(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml ``get_scale_min_k4`` for all 8 sub-blocks: ``(nb, 12)`` -> (sc, m) ``(nb, 8)`` int32."""
    q = q.astype(np.int32)
    sc = np.concatenate([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def _pack_scales_q3(l6: np.ndarray) -> np.ndarray:
    """Q3_K 12-byte scales from ``(nb, 16)`` 6-bit values (scale + 32)."""
    l6 = l6.astype(np.int32)
    out = np.zeros((l6.shape[0], 12), np.int32)  # (nb, 12)
    out[:, 0:8] = (l6[:, 0:8] & 0xF) | ((l6[:, 8:16] & 0xF) << 4)
    for j in range(16):
        out[:, 8 + j % 4] |= (l6[:, j] >> 4) << (2 * (j // 4))
    return (out & 0xFF).astype(np.uint8)


def _unpack_scales_q3(q: np.ndarray) -> np.ndarray:
    """``(nb, 12)`` -> ``(nb, 16)`` int32 signed sub-block scales (6-bit value - 32)."""
    q = q.astype(np.int32)
    low = np.concatenate([q[:, 0:8] & 0xF, q[:, 0:8] >> 4], axis=1)  # (nb, 16)
    high = np.stack([(q[:, 8 + j % 4] >> (2 * (j // 4))) & 3 for j in range(16)], axis=1)
    return (low | (high << 4)) - 32


# ----------------------------------------------------------------------------- choose_scales


def _sigma2(xt: np.ndarray, factor: float) -> np.ndarray:
    """``factor * sum(x*x) / 256`` per super-block in C's order; ``xt``: ``(256, nb)``."""
    return F32(factor) * seq_sum(xt * xt, axis=0) / F32(QK_K)


def _codes(L: np.ndarray) -> np.ndarray:
    """Position-major search codes ``(n, nb * 256 // n)`` -> ``(nb, 256)`` uint8."""
    return np.ascontiguousarray(L.T).reshape(-1, QK_K).astype(np.uint8)


def _per_sub(v: np.ndarray, n_sub: int) -> np.ndarray:
    """One value per sub-block ``(nb * n_sub,)`` -> position-major ``(n_sub, nb)``."""
    return np.ascontiguousarray(v.reshape(-1, n_sub).T)


def _sub_sums(wt: np.ndarray, n: int) -> np.ndarray:
    """Per sub-block sums of ``wt (256, nb)`` in C's order -> ``(256 // n, nb)``."""
    return seq_sum(wt.reshape(QK_K // n, n, -1).transpose(1, 0, 2), axis=0)  # sum over the n positions


def _choose_q2_k(x: np.ndarray, w: np.ndarray | None) -> KScales:
    xg = _groups(x, 16)  # (16, nb*16)
    if w is None:
        scales, mins, L = make_qkx_quants(xg, np.abs(xg), 3, -0.5, 0.1, 15, use_mad=True)
        scales, mins = _per_sub(scales, 16), _per_sub(mins, 16)  # (16, nb)
        max_scale = _seq_max(scales)  # (nb,)
        max_min = _seq_max(mins)
        has_s = max_scale > 0
        has_m = max_min > 0
        ls = nearest_int(F32(15) / np.where(has_s, max_scale, F32(1)) * scales)  # (16, nb)
        lm = nearest_int(F32(15) / np.where(has_m, max_min, F32(1)) * mins)
        ls = np.where(has_s, ls & 0xFF, 0)
        lm = np.where(has_m, lm, 0)
        d = _to_f16(np.where(has_s, max_scale / F32(15), F32(0)))
        dmin = _to_f16(np.where(has_m, max_min / F32(15), F32(0)))
    else:
        xt = x.T  # (256, nb)
        weight = w.T * np.sqrt(_sigma2(xt, 1.0) + xt * xt)  # (256, nb)
        sw = _sub_sums(weight, 16)  # (16, nb)
        scales, mins, L = make_qkx_quants(xg, _groups(weight.T, 16), 3, -0.9, 0.05, 36, use_mad=False)
        dm, ls = make_qp_quants(_per_sub(scales, 16), 15, sw)
        mm, lm = make_qp_quants(_per_sub(mins, 16), 15, sw)
        d = _to_f16(dm)
        dmin = _to_f16(mm)
    packed = ((ls | (lm << 4)) & 0xFF).T.astype(np.uint8)  # (nb, 16)
    return KScales(d, dmin, packed, _codes(L))


def _choose_q3_k(x: np.ndarray, w: np.ndarray | None) -> KScales:
    nb = x.shape[0]
    xg = _groups(x, 16)  # (16, nb*16)
    if w is None:
        scales, L = make_q3_quants(xg, 4)
        scales = _per_sub(scales, 16)  # (16, nb)
        _, max_scale = _seq_absmax(scales)  # (nb,)
        live = max_scale != 0
        iscale = F32(-32) / np.where(live, max_scale, F32(1))
        l8 = nearest_int(iscale * scales).astype(np.int8).astype(np.int32)  # C's int8_t store
        l6 = np.where(live, np.clip(l8, -32, 31) + 32, 0)  # (16, nb)
        d = _to_f16(np.where(live, F32(1) / iscale, F32(0)))
    else:
        xt = x.T  # (256, nb)
        weight = w.T * np.sqrt(_sigma2(xt, 2.0) + xt * xt)  # (256, nb)
        sw = _sub_sums(weight, 16)  # (16, nb)
        scales, L = make_qx_quants(xg, 4, _groups(weight.T, 16))
        d_block, l6 = make_qx_quants(_per_sub(scales, 16), 32, sw)
        d = _to_f16(d_block)
    return KScales(d, np.zeros(nb, np.float16), _pack_scales_q3(l6.T), _codes(L))


def _choose_q45_k(
    x: np.ndarray, w: np.ndarray | None, nmax: int, ref_search: tuple[float, float, int]
) -> KScales:
    xg = _groups(x, 32)  # (32, nb*8)
    if w is None:
        av_x = np.sqrt(seq_sum(xg * xg, axis=0) / F32(32))  # (nb*8,)
        scales, mins, L = make_qkx_quants(xg, av_x + np.abs(xg), nmax, *ref_search, use_mad=False)
        scales, mins = _per_sub(scales, 8), _per_sub(mins, 8)  # (8, nb)
        max_scale = _seq_max(scales)  # (nb,)
        max_min = _seq_max(mins)
        inv_scale = np.where(max_scale > 0, F32(63) / np.where(max_scale > 0, max_scale, F32(1)), F32(0))
        inv_min = np.where(max_min > 0, F32(63) / np.where(max_min > 0, max_min, F32(1)), F32(0))
        ls = np.minimum(63, nearest_int(inv_scale * scales) & 0xFF)  # (8, nb)
        lm = np.minimum(63, nearest_int(inv_min * mins) & 0xFF)
        d = _to_f16(max_scale / F32(63))
        dmin = _to_f16(max_min / F32(63))
    else:
        xt = x.T  # (256, nb)
        weight = w.T * np.sqrt(_sigma2(xt, 2.0) + xt * xt)  # (256, nb)
        sw = _sub_sums(weight, 32)  # (8, nb)
        scales, mins, L = make_qkx_quants(xg, _groups(weight.T, 32), nmax, -0.9, 0.05, 36, use_mad=False)
        d_block, ls = make_qp_quants(_per_sub(scales, 8), 63, sw)
        m_block, lm = make_qp_quants(_per_sub(mins, 8), 63, sw)
        if nmax == 31:  # Q5_K's impl clamps, Q4_K's does not (equal unless the search wrapped)
            ls = np.minimum(63, ls)
            lm = np.minimum(63, lm)
        d = _to_f16(d_block)
        dmin = _to_f16(m_block)
    return KScales(d, dmin, _pack_scales_k4(ls.T, lm.T), _codes(L))


def _choose_q4_k(x: np.ndarray, w: np.ndarray | None) -> KScales:
    return _choose_q45_k(x, w, 15, (-1.0, 0.1, 20))


def _choose_q5_k(x: np.ndarray, w: np.ndarray | None) -> KScales:
    return _choose_q45_k(x, w, 31, (-0.5, 0.1, 15))


def _choose_q6_k(x: np.ndarray, w: np.ndarray | None) -> KScales:
    nb = x.shape[0]
    scales, L = make_qx_quants(_groups(x, 16), 32, None if w is None else _groups(w, 16))
    scales = _per_sub(scales, 16)  # (16, nb)
    max_abs, max_scale = _seq_absmax(scales)  # (nb,)
    zero = max_abs < _GROUP_MAX_EPS
    iscale = F32(-128) / np.where(zero, F32(1), max_scale)
    sc = np.minimum(127, nearest_int(iscale * scales)).astype(np.int8)  # (16, nb) C's int8 store
    sc = np.where(zero, np.int8(0), sc)
    d = np.where(zero, np.float16(0), _to_f16(F32(1) / iscale))
    fallback = np.where(zero[:, None], 0, _codes(L)).astype(np.uint8)  # (nb, 256)
    return KScales(d, np.zeros(nb, np.float16), np.ascontiguousarray(sc.T).view(np.uint8), fallback)


# ----------------------------------------------------------------------------- pack / unpack


def _hbits(codes: np.ndarray, bit: int) -> np.ndarray:
    """``(nb, 256)`` -> ``(nb, 32)``: bit ``bit`` of element e goes to byte e%32, bit e//32."""
    hi = ((codes.reshape(-1, 8, 32).astype(np.int32) >> bit) & 1) << np.arange(8)[None, :, None]
    return hi.sum(axis=1).astype(np.uint8)


def _unhbits(h: np.ndarray) -> np.ndarray:
    """``(nb, 32)`` -> ``(nb, 256)`` int32 bits (inverse of ``_hbits``)."""
    return ((h[:, None, :].astype(np.int32) >> np.arange(8)[None, :, None]) & 1).reshape(-1, QK_K)


def _crumbs(codes: np.ndarray) -> np.ndarray:
    """2-bit codes ``(nb, 256)`` -> ``(nb, 64)``: per 128, byte l holds l, l+32, l+64, l+96."""
    c = codes.reshape(-1, 2, 4, 32).astype(np.int32) & 3
    return (c << (2 * np.arange(4))[None, None, :, None]).sum(axis=2).astype(np.uint8).reshape(-1, 64)


def _uncrumbs(qs: np.ndarray) -> np.ndarray:
    q = qs.reshape(-1, 2, 1, 32).astype(np.int32)
    return ((q >> (2 * np.arange(4))[None, None, :, None]) & 3).reshape(-1, QK_K)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """4-bit codes ``(nb, 256)`` -> ``(nb, 128)``: per 64, byte l holds l (low) and l+32 (high)."""
    c = codes.reshape(-1, 4, 2, 32).astype(np.int32) & 0xF
    return (c[:, :, 0] | (c[:, :, 1] << 4)).astype(np.uint8).reshape(-1, 128)


def _unnibbles(qs: np.ndarray) -> np.ndarray:
    q = qs.reshape(-1, 4, 1, 32).astype(np.int32)
    return ((q >> np.array([0, 4])[None, None, :, None]) & 0xF).reshape(-1, QK_K)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(v, dtype=np.float16).view(np.uint8).reshape(-1, 2)


def _f16_from(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).reshape(-1)


def _pack_q2_k(codes: np.ndarray, s: KScales) -> np.ndarray:
    return np.concatenate([s.packed, _crumbs(codes), _f16_bytes(s.d), _f16_bytes(s.dmin)], axis=1)


def _unpack_q2_k(raw: np.ndarray) -> tuple[np.ndarray, KScales]:
    codes = _uncrumbs(raw[:, 16:80]).astype(np.uint8)
    return codes, KScales(_f16_from(raw[:, 80:82]), _f16_from(raw[:, 82:84]), raw[:, 0:16].copy(), codes)


def _pack_q3_k(codes: np.ndarray, s: KScales) -> np.ndarray:
    return np.concatenate([_hbits(codes, 2), _crumbs(codes), s.packed, _f16_bytes(s.d)], axis=1)


def _unpack_q3_k(raw: np.ndarray) -> tuple[np.ndarray, KScales]:
    codes = (_uncrumbs(raw[:, 32:96]) | (_unhbits(raw[:, 0:32]) << 2)).astype(np.uint8)
    d = _f16_from(raw[:, 108:110])
    return codes, KScales(d, np.zeros_like(d), raw[:, 96:108].copy(), codes)


def _pack_q4_k(codes: np.ndarray, s: KScales) -> np.ndarray:
    return np.concatenate([_f16_bytes(s.d), _f16_bytes(s.dmin), s.packed, _nibbles(codes)], axis=1)


def _unpack_q4_k(raw: np.ndarray) -> tuple[np.ndarray, KScales]:
    codes = _unnibbles(raw[:, 16:144]).astype(np.uint8)
    return codes, KScales(_f16_from(raw[:, 0:2]), _f16_from(raw[:, 2:4]), raw[:, 4:16].copy(), codes)


def _pack_q5_k(codes: np.ndarray, s: KScales) -> np.ndarray:
    parts = [_f16_bytes(s.d), _f16_bytes(s.dmin), s.packed, _hbits(codes, 4), _nibbles(codes)]
    return np.concatenate(parts, axis=1)


def _unpack_q5_k(raw: np.ndarray) -> tuple[np.ndarray, KScales]:
    codes = (_unnibbles(raw[:, 48:176]) | (_unhbits(raw[:, 16:48]) << 4)).astype(np.uint8)
    return codes, KScales(_f16_from(raw[:, 0:2]), _f16_from(raw[:, 2:4]), raw[:, 4:16].copy(), codes)


def _pack_q6_k(codes: np.ndarray, s: KScales) -> np.ndarray:
    c = codes.reshape(-1, 2, 4, 32).astype(np.int32)  # (nb, half, quarter, 32)
    lo = c & 0xF
    ql = np.stack([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
    qh = ((c >> 4) << (2 * np.arange(4))[None, None, :, None]).sum(axis=2)  # (nb, 2, 32)
    parts = [ql.reshape(-1, 128), qh.reshape(-1, 64), s.packed, _f16_bytes(s.d)]
    return np.concatenate([p.astype(np.uint8) for p in parts], axis=1)


def _unpack_q6_k(raw: np.ndarray) -> tuple[np.ndarray, KScales]:
    ql = raw[:, 0:128].reshape(-1, 2, 2, 32).astype(np.int32)  # (nb, half, pair, 32)
    qh = raw[:, 128:192].reshape(-1, 2, 1, 32).astype(np.int32)  # (nb, half, 1, 32)
    lo = np.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
    hi = (qh >> (2 * np.arange(4))[None, None, :, None]) & 3  # (nb, 2, 4, 32)
    codes = (lo | (hi << 4)).reshape(-1, QK_K).astype(np.uint8)
    d = _f16_from(raw[:, 208:210])
    return codes, KScales(d, np.zeros_like(d), raw[:, 192:208].copy(), codes)


# ----------------------------------------------------------------------------- the types


@dataclass(frozen=True)
class KQuantType:
    """One K-quant type: its geometry, code range, and the type-specific steps."""

    name: str
    sub: int  # weights per sub-block (16 or 32)
    lo: int  # code range before the bias: l in [lo, hi], stored code = l + bias
    hi: int
    bias: int  # 0 for the (scale, min) types Q2_K/Q4_K/Q5_K, else -lo
    choose: Callable[[np.ndarray, np.ndarray | None], KScales]
    pack: Callable[[np.ndarray, KScales], np.ndarray]
    unpack: Callable[[np.ndarray], tuple[np.ndarray, KScales]]

    @property
    def type_id(self) -> int:
        return ggml_type(self.name).type_id

    @property
    def type_size(self) -> int:
        return ggml_type(self.name).type_size

    @property
    def has_min(self) -> bool:
        return self.bias == 0

    def levels(self, s: KScales) -> tuple[np.ndarray, np.ndarray]:
        """Quantized sub-block scales and mins ``(nb, 256 // sub)`` int32, as decoding reads them."""
        p = s.packed
        if self.name == "Q2_K":
            return (p & 0xF).astype(np.int32), (p >> 4).astype(np.int32)
        if self.name == "Q3_K":
            sc = _unpack_scales_q3(p)
            return sc, np.zeros_like(sc)
        if self.name == "Q6_K":
            sc = p.view(np.int8).astype(np.int32)
            return sc, np.zeros_like(sc)
        return _unpack_scales_k4(p)

    def step_offset(self, s: KScales) -> tuple[np.ndarray, np.ndarray]:
        """Per sub-block ``(nb, 256 // sub)`` float32 step ``d*sc`` and offset ``dmin*m``:
        a code q decodes to ``step * (q - bias) - offset`` (offset 0 for Q3_K / Q6_K)."""
        sc, m = self.levels(s)
        step = s.d.astype(np.float32)[:, None] * sc.astype(np.float32)
        offset = s.dmin.astype(np.float32)[:, None] * m.astype(np.float32)
        return step, offset

    def encode(self, x: np.ndarray, s: KScales) -> np.ndarray:
        """Codes ``(nb, 256)`` uint8 of ``x (nb, 256)`` under fixed scales: ggml's requantization
        ``clamp(nearest_int((x + offset) / step))``; where a sub-block's step is 0, ``s.fallback``."""
        nb = x.shape[0]
        step, offset = self.step_offset(s)  # (nb, n_sub)
        xs = x.reshape(nb, -1, self.sub)  # (nb, n_sub, sub)
        live = step != 0
        div = np.where(live, step, F32(1))[:, :, None]
        v = xs / div if not self.has_min else (xs + offset[:, :, None]) / div
        q = np.clip(nearest_int(v), self.lo, self.hi) + self.bias  # (nb, n_sub, sub)
        fallback = s.fallback.reshape(nb, -1, self.sub)
        return np.where(live[:, :, None], q, fallback).reshape(nb, QK_K).astype(np.uint8)

    def decode(self, codes: np.ndarray, s: KScales) -> np.ndarray:
        """``(nb, 256)`` codes -> float32 values, as ggml's ``dequantize_row_q*_K``."""
        nb = codes.shape[0]
        step, offset = self.step_offset(s)  # (nb, n_sub)
        q = codes.reshape(nb, -1, self.sub).astype(np.int32) - self.bias  # (nb, n_sub, sub)
        y = step[:, :, None] * q.astype(np.float32)
        if self.has_min:
            y = y - offset[:, :, None]
        return y.reshape(nb, QK_K)

    def code_levels(self, raw: np.ndarray) -> np.ndarray:
        """``(nb, type_size)`` blocks -> ``(256 // sub, nb, n_codes)`` float32: the value each code
        of each sub-block decodes to, as ``dequantize_row_q*_K`` computes it."""
        step, offset = self.step_offset(
            self.unpack(np.ascontiguousarray(raw, dtype=np.uint8))[1]
        )  # (nb, n_sub)
        levels = step.T[:, :, None] * np.arange(self.lo, self.hi + 1, dtype=F32)  # (n_sub, nb, n_codes)
        if self.has_min:
            levels = levels - offset.T[:, :, None]
        return levels

    def pack_codes(self, raw: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """``codes (nb, 256)`` packed under the scales of the blocks ``raw``."""
        return self.pack(
            np.asarray(codes, dtype=np.uint8), self.unpack(np.ascontiguousarray(raw, dtype=np.uint8))[1]
        )

    def grid(self) -> CodeGrid:
        return CodeGrid(
            np.arange(self.lo, self.hi + 1, dtype=F32), self.sub, self.code_levels, self.pack_codes
        )

    def quantize_blocks(self, x: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != QK_K:
            raise QuantError(f"{self.name}: expected (n_blocks, {QK_K}) blocks, got shape {x.shape}")
        if w is not None:
            w = np.ascontiguousarray(w, dtype=np.float32)
            if w.shape != x.shape:
                raise QuantError(f"{self.name}: weights have shape {w.shape}, blocks {x.shape}")
        out = np.empty((x.shape[0], self.type_size), np.uint8)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for at in range(0, x.shape[0], _CHUNK):  # super-blocks are independent; chunks stay in cache
                xc = x[at : at + _CHUNK]
                s = self.choose(xc, None if w is None else w[at : at + _CHUNK])
                out[at : at + _CHUNK] = self.pack(self.encode(xc, s), s)
        return out

    def dequantize_blocks(self, raw: np.ndarray) -> np.ndarray:
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        if raw.ndim != 2 or raw.shape[1] != self.type_size:
            raise QuantError(f"{self.name}: expected (n_blocks, {self.type_size}) bytes, got {raw.shape}")
        codes, s = self.unpack(raw)
        with np.errstate(over="ignore", invalid="ignore"):
            return self.decode(codes, s)


KQUANTS: dict[str, KQuantType] = {
    t.name: t
    for t in (
        KQuantType("Q2_K", 16, 0, 3, 0, _choose_q2_k, _pack_q2_k, _unpack_q2_k),
        KQuantType("Q3_K", 16, -4, 3, 4, _choose_q3_k, _pack_q3_k, _unpack_q3_k),
        KQuantType("Q4_K", 32, 0, 15, 0, _choose_q4_k, _pack_q4_k, _unpack_q4_k),
        KQuantType("Q5_K", 32, 0, 31, 0, _choose_q5_k, _pack_q5_k, _unpack_q5_k),
        KQuantType("Q6_K", 16, -32, 31, 32, _choose_q6_k, _pack_q6_k, _unpack_q6_k),
    )
}


def _kind(type_name: str) -> KQuantType:
    kind = KQUANTS.get(type_name.upper())
    if kind is None:
        raise QuantError(f"{type_name!r} is not a K-quant type; known: {', '.join(KQUANTS)}")
    return kind


def choose_scales(type_name: str, x: np.ndarray, w: np.ndarray | None = None) -> KScales:
    """ggml's scale choice for ``x (nb, 256)`` float32 (and imatrix weights ``w``, same shape)."""
    kind = _kind(type_name)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return kind.choose(
            np.ascontiguousarray(x, dtype=np.float32), w if w is None else np.asarray(w, np.float32)
        )


def encode(type_name: str, x: np.ndarray, scales: KScales) -> np.ndarray:
    """Codes ``(nb, 256)`` uint8 of ``x`` under already-chosen ``scales``."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return _kind(type_name).encode(np.ascontiguousarray(x, dtype=np.float32), scales)


def pack(type_name: str, codes: np.ndarray, scales: KScales) -> np.ndarray:
    """``(nb, 256)`` codes and their scales -> ``(nb, type_size)`` uint8 blocks."""
    return _kind(type_name).pack(np.asarray(codes, dtype=np.uint8), scales)


def unpack(type_name: str, raw: np.ndarray) -> tuple[np.ndarray, KScales]:
    """``(nb, type_size)`` uint8 blocks -> (codes ``(nb, 256)``, scales)."""
    return _kind(type_name).unpack(np.ascontiguousarray(raw, dtype=np.uint8))


def decode(type_name: str, codes: np.ndarray, scales: KScales) -> np.ndarray:
    """Codes and scales -> ``(nb, 256)`` float32, bit-equal to ggml's dequantization."""
    return _kind(type_name).decode(np.asarray(codes, dtype=np.uint8), scales)


def step_offset(type_name: str, scales: KScales) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block step and offset ``(nb, 256 // sub)``; see :meth:`KQuantType.step_offset`."""
    return _kind(type_name).step_offset(scales)


for _t in KQUANTS.values():
    register(_t.name, _t.quantize_blocks, _t.dequantize_blocks, grid=_t.grid())
