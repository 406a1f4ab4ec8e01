"""GPTQ whose quantizer is the target ggml block format.

Columns (input features) are quantized left to right with error feedback through the inverse
Hessian (Frantar et al., 2022). A ggml block spans ``group`` consecutive columns of a row, so
the block's scales are chosen when the solver reaches the block's first column, from the
weights as they are then (already corrected for the error of earlier columns), weighted by the
Hessian diagonal (the imatrix idea). Each column is then rounded to the nearest of the values
that block can decode to, read from ggml-exact decoding tables: the error fed back is the error
of the value llama.cpp will dequantize from the file, and the solver's final weights equal
ggml's dequantization of the bytes written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ggq import ggml
from ggq.ggml import kquants, legacy
from ggq.ggml.floats import fp16_field


class SolverError(ValueError):
    """A tensor or Hessian the solver cannot handle; names what is wrong."""


@dataclass(frozen=True)
class GroupFit:
    """Fixed scales of one group of columns, for all rows."""

    levels: np.ndarray  # (n_codes, rows, n_sub) float32: the exact value each code decodes to
    sub: int  # columns per sub-block (levels are constant within one)
    payload: object  # what ``pack`` needs: KScales, or the block bytes with scales in place


class Target:
    """A ggml block type as a GPTQ quantizer: fit scales on a group, pack codes with them."""

    def __init__(self, type_name: str) -> None:
        self.name = type_name.upper()
        self.fmt = ggml.get(self.name)
        self.group = self.fmt.block_size
        if self.name in kquants.KQUANTS:
            kind = kquants.KQUANTS[self.name]
            self.n_codes = kind.hi - kind.lo + 1
            self.sub = kind.sub
        elif self.name in _LEGACY:
            self.n_codes, self.sub = _LEGACY[self.name][0], self.group
        else:
            raise SolverError(
                f"GPTQ cannot target {self.name} yet; supported: {', '.join(supported_types())}"
            )

    def fit(self, w: np.ndarray, importance: np.ndarray | None) -> GroupFit:
        """Scales for ``w`` (rows, group) float32, as ggml's (imatrix) encoder would choose them."""
        rows = w.shape[0]
        imat = None if importance is None else np.broadcast_to(importance, w.shape).astype(np.float32)
        if self.name in kquants.KQUANTS:
            scales = kquants.choose_scales(self.name, w, imat)
            table = np.stack(
                [
                    kquants.decode(self.name, np.full(w.shape, c, np.uint8), scales)
                    for c in range(self.n_codes)
                ]
            )  # (n_codes, rows, group)
            return GroupFit(table[:, :, :: self.sub].reshape(self.n_codes, rows, -1), self.sub, scales)
        raw = ggml.quantize(w, self.name, importance)  # (rows, type_size)
        levels = _LEGACY[self.name][1](raw)  # (n_codes, rows)
        return GroupFit(levels[:, :, None], self.sub, raw)

    def pack(self, fit: GroupFit, codes: np.ndarray) -> np.ndarray:
        """``codes`` (rows, group) uint8 -> the rows' block bytes (rows, type_size)."""
        if self.name in kquants.KQUANTS:
            assert isinstance(fit.payload, kquants.KScales)
            return kquants.pack(self.name, codes, fit.payload)
        assert isinstance(fit.payload, np.ndarray)
        return _LEGACY[self.name][2](fit.payload, codes)


def _q4_0_levels(raw: np.ndarray) -> np.ndarray:
    d = fp16_field(raw, 0)  # (rows,)
    return np.stack([np.float32(c - 8) * d for c in range(16)])  # (16, rows): ggml's (q - 8) * d


def _q4_0_pack(raw: np.ndarray, codes: np.ndarray) -> np.ndarray:
    out = raw.copy()
    out[:, 2:18] = legacy.pack_nibbles(codes)
    return out


def _q8_0_levels(raw: np.ndarray) -> np.ndarray:
    d = fp16_field(raw, 0)
    return np.stack([np.float32(c - 128) * d for c in range(256)])  # stored code c means int8 c - 128


def _q8_0_pack(raw: np.ndarray, codes: np.ndarray) -> np.ndarray:
    out = raw.copy()
    out[:, 2:34] = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    return out


# type -> (number of codes, levels from block bytes, pack codes into block bytes)
_LEGACY = {"Q4_0": (16, _q4_0_levels, _q4_0_pack), "Q8_0": (256, _q8_0_levels, _q8_0_pack)}


def supported_types() -> list[str]:
    return [*_LEGACY, *kquants.KQUANTS]


@dataclass(frozen=True)
class GPTQResult:
    data: np.ndarray  # (rows, row_bytes) uint8: the tensor as written to the GGUF
    weights: np.ndarray  # (rows, cols) float32: the values llama.cpp dequantizes from ``data``
    damp: float  # the damping that made H positive definite


def _inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of H^-1, damping raised (x10) until H is positive definite."""
    mean_diag = float(torch.diag(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper, damp
        damp *= 10
    raise SolverError(f"Hessian not positive definite even with damping {damp:g} x mean diagonal")


def gptq(w: np.ndarray, h: np.ndarray, target: Target, damp: float = 0.01, block: int = 256) -> GPTQResult:
    """Quantize ``w`` (rows, cols) to ``target`` with Hessian ``h`` (cols, cols) = sum of x x^T."""
    rows, cols = w.shape
    if cols % target.group:
        raise SolverError(f"{target.name}: {cols} columns are not a whole number of {target.group}-blocks")
    W = torch.from_numpy(np.array(w, dtype=np.float32))  # (rows, cols), updated in place
    H = torch.from_numpy(np.array(h, dtype=np.float64))
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    importance = torch.diag(H).to(torch.float32).numpy()
    Hinv, damp = _inverse_cholesky(H, damp)
    Hinv = Hinv.to(torch.float32)
    block = max(block // target.group, 1) * target.group
    Q = torch.zeros_like(W)
    codes = np.zeros((rows, cols), dtype=np.uint8)
    fits: list[GroupFit] = []
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        W1 = W[:, b0:b1].clone()  # (rows, nb)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[b0:b1, b0:b1]
        fit = None
        for i in range(b1 - b0):
            col = b0 + i
            if col % target.group == 0:
                g = W1[:, i : i + target.group].numpy()
                fit = target.fit(np.ascontiguousarray(g), importance[col : col + target.group])
                fits.append(fit)
            assert fit is not None
            levels = torch.from_numpy(fit.levels[:, :, (col % target.group) // fit.sub])  # (n_codes, rows)
            x = W1[:, i]
            c = torch.argmin((levels - x).abs(), dim=0)  # (rows,) nearest decodable value
            q = levels.gather(0, c[None])[0]
            codes[:, col] = c.numpy().astype(np.uint8)
            Q[:, col] = q
            err = (x - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, b1:] -= Err1 @ Hinv[b0:b1, b1:]
    data = np.concatenate(
        [target.pack(f, codes[:, k * target.group : (k + 1) * target.group]) for k, f in enumerate(fits)],
        axis=1,
    )
    return GPTQResult(data=data, weights=Q.numpy(), damp=damp)
