"""Textbook GPTQ in plain numpy whose quantizer is ggml itself: the reference for ggq's solver.

The loop is Algorithm 1 of Frantar et al., "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (2022), without its lazy batches (they only reorder the
arithmetic), with the paper's grouping: H is damped by ``damp * mean(diag H)``, the upper Cholesky
factor U of H^-1 (H^-1 = U^T U) is taken once, and the columns are quantized one at a time, the
error of column j fed into the columns after it, ``W[:, j+1:] -= (w_j - q_j) / U[j, j] * U[j, j+1:]``.

The quantizer of a group is a ggml block. As in the paper's grouped GPTQ (the authors' code calls
``find_params`` on the group's columns when the loop reaches its first column, then rounds every
column of the group on that grid), the block's scales are chosen when the loop reaches the block's
first column, by ggml's own ``ggml_quantize_chunk`` on the block's weights as they are then (the
error of all earlier columns already fed in), with the Hessian diagonal as its importance weights
(``quant_weights``, the imatrix). Each column j of the block is then rounded to the nearest value
that this block can decode to at j's position, given the current (error-corrected) w_j. Those
values are read from ggml's own dequantizer (``to_float``): the block's bytes with every code set
to c decode, at each position, to what code c means there. So each q_j is a value ggml decodes
from the block's bytes with q_j's code at position j, and the result is a tensor llama.cpp can
load bit for bit (codes of different positions are independent in these formats).

Two other readings were rejected: fixing the whole block to ggml's dequantization of its weights
at block start would ignore the error feedback within a block (a Q4_K block spans 256 of
ffn_down's 768 columns: that is nearly RTN); re-running ggml's quantizer for every column would
give each column of a block other scales, values that no block of the file decodes to.

Nothing here comes from ggq's solvers or encoders: ggml is called through ``tests.ggml_ref``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tests import ggml_ref


def _fill(*regions: tuple[int, int, Callable[[int], int]]) -> Callable[[np.ndarray, int], np.ndarray]:
    """``fill(raw, c)``: the blocks ``raw`` (rows, type_size) with every code set to c. Each region
    [start, stop) of the block struct (ggml-common.h) holds code bits; ``byte(c)`` is each of its
    bytes in a block whose codes are all c."""

    def fill(raw: np.ndarray, c: int) -> np.ndarray:
        out = raw.copy()
        for start, stop, byte in regions:
            out[:, start:stop] = byte(c)
        return out

    return fill


@dataclass(frozen=True)
class BlockType:
    """A ggml block type, from ggml.h and its block struct in ggml-common.h."""

    type_id: int  # enum ggml_type
    ggml_name: bytes  # the type_name of its ggml type traits (checked against ggml)
    block: int  # weights per block
    n_codes: int
    fill: Callable[[np.ndarray, int], np.ndarray]


def _low4(c: int) -> int:  # two 4-bit fields a byte
    return (c & 15) * 0x11


def _high2(c: int) -> int:  # bits 4-5, four 2-bit fields a byte
    return (c >> 4) * 0x55


def _high1(c: int) -> int:  # bit 4, eight 1-bit fields a byte
    return (c >> 4) * 0xFF


def _low2(c: int) -> int:  # four 2-bit fields a byte
    return c * 0x55


def _byte(c: int) -> int:
    return c


TYPES = {
    # block_q4_0: fp16 d, qs[16] (4-bit codes)
    "Q4_0": BlockType(2, b"q4_0", 32, 16, _fill((2, 18, _low4))),
    # block_q4_K: fp16 d, fp16 dmin, scales[12], qs[128] (4-bit codes)
    "Q4_K": BlockType(12, b"q4_K", 256, 16, _fill((16, 144, _low4))),
    # block_q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16], fp16 d
    "Q6_K": BlockType(14, b"q6_K", 256, 64, _fill((0, 128, _low4), (128, 192, _high2))),
    # block_q5_1: fp16 d, fp16 m, qh[4] (fifth bits), qs[16] (low 4 bits)
    "Q5_1": BlockType(7, b"q5_1", 32, 32, _fill((4, 8, _high1), (8, 24, _low4))),
    # block_q8_0: fp16 d, int8 qs[32] (code c is the byte c)
    "Q8_0": BlockType(8, b"q8_0", 32, 256, _fill((2, 34, _byte))),
    # block_iq4_nl: fp16 d, qs[16] (4-bit indexes into kvalues_iq4nl)
    "IQ4_NL": BlockType(20, b"iq4_nl", 32, 16, _fill((2, 18, _low4))),
    # block_q2_K: scales[16], qs[64] (2-bit codes), fp16 d, fp16 dmin
    "Q2_K": BlockType(10, b"q2_K", 256, 4, _fill((16, 80, _low2))),
}


def block_type(name: str) -> BlockType:
    t = TYPES[name]
    traits = ggml_ref.traits(t.type_id)
    assert traits.type_name == t.ggml_name and traits.blck_size == t.block, (name, traits.type_name)
    return t


def rtn(w: np.ndarray, name: str, importance: np.ndarray | None) -> np.ndarray:
    """ggml's own quantize (imatrix ``importance``) and dequantize of whole rows."""
    t = block_type(name)
    return ggml_ref.dequantize(ggml_ref.quantize(w, t.type_id, importance), t.type_id, w.shape[1])


def block_values(w: np.ndarray, t: BlockType, importance: np.ndarray) -> np.ndarray:
    """ggml's block of ``w`` (rows, block) -> (n_codes, rows, block) float32: what each code
    decodes to at each position of each row's block."""
    raw = ggml_ref.quantize(w, t.type_id, importance)
    values = np.stack([ggml_ref.dequantize(t.fill(raw, c), t.type_id, t.block) for c in range(t.n_codes)])
    # ggml's decoding of its own block picks, at every position, one of these values
    decoded = ggml_ref.dequantize(raw, t.type_id, t.block)
    assert (values == decoded[None]).any(axis=0).all()
    return values


def gptq(w: np.ndarray, h: np.ndarray, name: str, damp: float = 0.01) -> np.ndarray:
    """GPTQ of ``w`` (rows, cols) with ``h`` (cols, cols) = sum over tokens of x x^T, to ggml
    type ``name``: the quantized weights (rows, cols) float32, each a value ggml decodes."""
    t = block_type(name)
    W = np.array(w, dtype=np.float64)
    H = np.array(h, dtype=np.float64)
    rows, cols = W.shape
    dead = np.diag(H) == 0  # an input that is always 0: its weights do not matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    importance = np.diag(H).astype(np.float32)
    H[np.diag_indices(cols)] += damp * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: H^-1 = U^T U
    Q = np.zeros((rows, cols), dtype=np.float32)
    at = np.arange(rows)
    values = np.empty(0)
    for j in range(cols):
        k = j % t.block
        if k == 0:
            values = block_values(W[:, j : j + t.block].astype(np.float32), t, importance[j : j + t.block])
        x = W[:, j]
        v = values[:, :, k]  # (n_codes, rows)
        q = v[np.argmin(np.abs(v - x), axis=0), at]
        Q[:, j] = q
        err = (x - q) / U[j, j]
        W[:, j + 1 :] -= np.outer(err, U[j, j + 1 :])
    return Q
