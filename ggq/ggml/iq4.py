"""IQ4_NL (32-weight blocks) and IQ4_XS (256-weight super-blocks), byte-exact with ggml.

Both store 4-bit indices into the non-linear table ``KVALUES_IQ4NL``. ggml_quantize_chunk runs
quantize_row_iq4_nl_impl with ntry = 7 for both types, with and without an imatrix: per
32-weight block a weighted search over 16 candidate scales, weights ``x*x`` without an imatrix
and ``imatrix * sqrt(sigma2 + x*x)`` with one, ``sigma2 = 2 * mean(x*x)`` over the (super-)block.
IQ4_NL stores the block scale as fp16; IQ4_XS stores an fp16 super-block scale and a 6-bit
signed multiplier per block.
"""

from __future__ import annotations

import numpy as np

from ggq.ggml.floats import fp16_bytes, fp16_field, nearest_int, seq_sum
from ggq.ggml.legacy import (
    GROUP_MAX_EPS,
    block32_grid,
    first_absmax,
    inverse_or_zero,
    pack_nibbles,
    safe_div,
    unpack_nibbles,
)
from ggq.ggml.registry import register

F32 = np.float32
QK4_NL = 32
QK_K = 256
NTRY = 7  # ggml_quantize_chunk's candidate scales on each side of the first guess

KVALUES_IQ4NL = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=F32
)


def best_index(v: np.ndarray) -> np.ndarray:
    """ggml's best_index_int8 over KVALUES_IQ4NL: the nearest table entry, the upper one on a tie.

    Any shape float32 -> same shape int64 indices 0..15.
    """
    upper = np.clip(
        np.searchsorted(KVALUES_IQ4NL, v, side="right"), 1, 15
    )  # table[upper-1] <= v < table[upper]
    below = v - KVALUES_IQ4NL[upper - 1] < KVALUES_IQ4NL[upper] - v
    idx = np.where(below, upper - 1, upper)
    idx = np.where(v >= KVALUES_IQ4NL[15], 15, idx)
    return np.where(v <= KVALUES_IQ4NL[0], 0, idx)


def block_importance(x: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    """``(n, k)`` (super-)blocks -> ``(n, k)`` weights: ``x*x``, or ``w * sqrt(sigma2 + x*x)``."""
    if w is None:
        return x * x
    sigma2 = seq_sum(x * x, axis=1) * F32(2.0 / x.shape[1])  # (n,)
    return w * np.sqrt(sigma2[:, None] + x * x)


def block_scales(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``(nb, 32)`` values and weights -> ``(nb,)`` float32 scales (0 for an all-zero block).

    First guess ``d = max / 127`` (the element of largest magnitude lands on -127), least-squares
    refit, then 2*NTRY+1 more grids ``1/d = (itry - 127) / max``, keeping the best fit.
    """
    amax, vmax = first_absmax(x)
    empty = amax < GROUP_MAX_EPS  # (nb,)
    vmax = np.where(empty, F32(1), vmax)

    def fit(inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = KVALUES_IQ4NL[best_index(inv[:, None] * x)]  # (nb, 32)
        return seq_sum(weights * q * x, axis=1), seq_sum(weights * q * q, axis=1)

    sumqx, sumq2 = fit(F32(1) / (-vmax / KVALUES_IQ4NL[0]))
    d = np.where(sumq2 > 0, safe_div(sumqx, sumq2), F32(0))
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        sumqx, sumq2 = fit(F32(itry - 127) / vmax)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)  # (nb,)
        d = np.where(better, safe_div(sumqx, sumq2), d)
        best = np.where(better, d * sumqx, best)
    return np.where(empty, F32(0), d).astype(F32)


def quantize_iq4_nl(x: np.ndarray, w: np.ndarray | None = None, n_per_row: int | None = None) -> np.ndarray:
    """``(nb, 32)`` -> ``(nb, 18)``: fp16 d, 16 bytes of nibbles; value = d * KVALUES_IQ4NL[code]."""
    d = block_scales(x, block_importance(x, w))  # (nb,)
    codes = best_index(inverse_or_zero(d)[:, None] * x)  # (nb, 32)
    return np.concatenate([fp16_bytes(d), pack_nibbles(codes)], axis=1)


def dequantize_iq4_nl(raw: np.ndarray) -> np.ndarray:
    d = fp16_field(raw, 0)  # (nb,)
    return d[:, None] * KVALUES_IQ4NL[unpack_nibbles(raw[:, 2:18])]


def quantize_iq4_xs(x: np.ndarray, w: np.ndarray | None = None, n_per_row: int | None = None) -> np.ndarray:
    """``(nsb, 256)`` -> ``(nsb, 136)``: fp16 d, uint16 scales_h, 4 bytes scales_l, 128 bytes of nibbles.

    Block ib of a super-block has the 6-bit multiplier ``ls = low nibble | 2 high bits << 4`` and
    value = d * (ls - 32) * KVALUES_IQ4NL[code].
    """
    nsb = x.shape[0]
    blocks = x.reshape(nsb * 8, 32)  # (nsb*8, 32)
    weights = block_importance(x, w).reshape(nsb * 8, 32)
    scales = block_scales(blocks, weights).reshape(nsb, 8)  # (nsb, 8)

    _, max_scale = first_absmax(scales)
    d = -max_scale / F32(32)  # (nsb,) -0.0 for an all-zero super-block, as in C
    ls = np.clip(nearest_int(inverse_or_zero(d)[:, None] * scales), -32, 31)  # (nsb, 8)
    dl = d[:, None] * ls.astype(F32)  # (nsb, 8)
    codes = best_index(inverse_or_zero(dl.reshape(-1))[:, None] * blocks)  # (nsb*8, 32)

    ls = (ls + 32).astype(np.uint16)  # 0..63
    scales_l = ((ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)).astype(np.uint8)  # (nsb, 4)
    scales_h = np.zeros(nsb, dtype=np.uint16)
    for ib in range(8):
        scales_h |= (ls[:, ib] >> 4) << (2 * ib)
    return np.concatenate(
        [
            fp16_bytes(d),
            scales_h.astype("<u2").view(np.uint8).reshape(nsb, 2),
            scales_l,
            pack_nibbles(codes).reshape(nsb, 128),
        ],
        axis=1,
    )


def dequantize_iq4_xs(raw: np.ndarray) -> np.ndarray:
    nsb = raw.shape[0]
    d = fp16_field(raw, 0)  # (nsb,)
    scales_h = raw[:, 2].astype(np.int32) | (raw[:, 3].astype(np.int32) << 8)  # (nsb,)
    low = np.stack([raw[:, 4:8] & 0xF, raw[:, 4:8] >> 4], axis=2).reshape(nsb, 8)  # (nsb, 8)
    high = (scales_h[:, None] >> (2 * np.arange(8))) & 3  # (nsb, 8)
    dl = d[:, None] * ((low.astype(np.int32) | (high << 4)) - 32).astype(F32)  # (nsb, 8)
    codes = unpack_nibbles(raw[:, 8:136].reshape(nsb * 8, 16))  # (nsb*8, 32)
    return (dl.reshape(-1, 1) * KVALUES_IQ4NL[codes]).reshape(nsb, 256)


register(
    "IQ4_NL",
    quantize_iq4_nl,
    dequantize_iq4_nl,
    grid=block32_grid(KVALUES_IQ4NL.astype(F32), False, pack_nibbles),  # d, then nibbles
)
register("IQ4_XS", quantize_iq4_xs, dequantize_iq4_xs)
