"""GPTQ whose quantizer is the target ggml block format.

Columns (input features) are quantized one at a time with error feedback through the inverse
Hessian (Frantar et al., 2022). A ggml block spans ``group`` consecutive columns of a row, so
the block's scales are chosen when the solver reaches the block's first column, from the
weights as they are then (already corrected for the error of earlier columns), weighted by the
Hessian diagonal (the imatrix idea), by ggml's own encoder. Each column is then rounded to the
nearest of the values that block can decode to, read from ggml-exact decoding tables: the error
fed back is the error of the value llama.cpp will dequantize from the file, and the solver's
final weights equal ggml's dequantization of the bytes written.

With ``act_order`` the columns are processed in order of decreasing Hessian diagonal. A block's
columns are then no longer processed together, so every block's scales are fitted up front on
the original weights ("static groups") and each column is rounded on its own block's grid.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace

import numpy as np
import torch

from ggq import ggml
from ggq.solvers.options import SolverError, supported_types, timed
from ggq.solvers.reductions import one_thread

F32 = np.float32


@dataclass(frozen=True)
class GroupFit:
    """Fixed scales of one group (ggml block) of columns, for all rows."""

    levels: np.ndarray  # (n_sub, rows, n_codes) float32: the exact value each code decodes to
    sub: int  # columns per sub-block (levels are constant within one)
    raw: np.ndarray  # (rows, type_size) uint8: ggml's encoding of the group; pack replaces its codes


class Target:
    """A ggml block type as a GPTQ quantizer: fit scales on a group, pack codes with them."""

    def __init__(self, type_name: str) -> None:
        self.name = type_name.upper()
        fmt = ggml.FORMATS.get(self.name)
        if fmt is None or fmt.grid is None:
            raise SolverError(
                f"GPTQ cannot target {self.name} yet; supported: {', '.join(supported_types())}"
            )
        self.fmt, self.grid = fmt, fmt.grid
        self.unit, self.sub = fmt.grid.unit, fmt.grid.sub
        self.group = self.fmt.block_size
        self.n_codes = len(self.unit)
        self.uniform = bool(np.all(np.diff(self.unit) == 1))  # codes are integer steps apart

    def fit(self, w: np.ndarray, importance: np.ndarray | None) -> GroupFit:
        """Scales for ``w`` (rows, group) float32, as ggml's (imatrix) encoder chooses them."""
        with timed("encode"):
            raw = ggml.quantize(w, self.name, importance)  # (rows, type_size)
            levels = self.grid.levels(raw)  # (n_sub, rows, n_codes)
        return GroupFit(np.ascontiguousarray(levels, dtype=F32), self.sub, raw)

    def pack(self, fit: GroupFit, codes: np.ndarray) -> np.ndarray:
        """``codes`` (rows, group) uint8 -> the rows' block bytes (rows, type_size)."""
        with timed("encode"):
            return self.grid.pack(fit.raw, codes)


@dataclass(frozen=True)
class _Grid:
    """One sub-block's decodable values per row, laid out for the nearest-value search."""

    padded: np.ndarray  # (n_codes + 4, rows) float32: code c's level at row c + 2, two +inf rows each side
    origin: np.ndarray  # (rows,) float32: the level of code 0
    to_unit: np.ndarray  # (rows,) float32: unit distance per value distance, 0 for a flat row

    @classmethod
    def of(cls, levels: np.ndarray, unit: np.ndarray) -> _Grid:
        """``levels`` (rows, n_codes), an increasing or decreasing affine image of ``unit``."""
        pad = np.full((2, levels.shape[0]), np.inf, dtype=F32)
        span = levels[:, -1] - levels[:, 0]
        with np.errstate(over="ignore"):  # a subnormal span: the search then falls back to all codes
            to_unit = np.where(span != 0, (unit[-1] - unit[0]) / np.where(span != 0, span, 1), 0)
        return cls(np.concatenate([pad, levels.T, pad]), levels[:, 0].copy(), to_unit.astype(F32))

    def nearest(self, x: np.ndarray, unit: np.ndarray, uniform: bool) -> tuple[np.ndarray, np.ndarray]:
        """Code (rows,) intp and value (rows,) of the level nearest to ``x`` (rows,): the first
        code of least ``|level - x|`` in float32, exactly what an argmin over all codes gives."""
        rows, n = x.shape[0], unit.shape[0]
        pos = (x - self.origin) * self.to_unit + unit[0]  # (rows,) x in unit coordinates
        with np.errstate(invalid="ignore"):  # NaN / inf positions land on an edge and are checked below
            c0 = np.rint(pos).astype(np.intp) - int(unit[0]) if uniform else np.searchsorted(unit, pos)
        np.clip(c0, 1, n - 2, out=c0)  # the nearest code is c0 - 1, c0 or c0 + 1
        at = c0 * rows + np.arange(rows)  # (rows,) flat index of code c0 - 2 in ``padded``
        near = self.padded.take(at + (np.arange(5) * rows)[:, None])  # (5, rows): codes c0 - 2 .. c0 + 2
        dist = np.abs(near - x)  # (5, rows)
        j = (dist[2] < dist[1]).astype(np.intp)  # first minimum of the middle three
        best = np.minimum(dist[1], dist[2])
        j[dist[3] < best] = 2
        best = np.minimum(best, dist[3])
        codes = c0 - 1 + j
        values = near.take((j + 1) * rows + np.arange(rows))
        # Levels are monotone in the code, so |level - x| falls to its minimum and rises after
        # it: strictly larger distances just outside the window prove its first minimum is the
        # first global one. Otherwise (a flat row, x far outside the grid) search every code.
        bad = ~((dist[0] > best) & (dist[4] > best))
        if bad.any():
            full = np.abs(self.padded[2 : n + 2, bad] - x[bad])  # (n_codes, n_bad)
            codes[bad] = np.argmin(full, axis=0)
            values[bad] = self.padded[codes[bad] + 2, np.flatnonzero(bad)]
        return codes, values


@dataclass(frozen=True)
class GPTQResult:
    data: np.ndarray  # (rows, row_bytes) uint8: the tensor as written to the GGUF
    weights: np.ndarray  # (rows, cols) float32: the values llama.cpp dequantizes from ``data``
    damp: float  # the damping used: the requested one, or raised until H was positive definite


def _inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of H^-1, damping raised (x10, five times at most) until H is
    positive definite; returns it with the damping it took.

    Computed in place in ``h`` (n, n) float64, which holds the factor after: one n x n matrix
    instead of four (Qwen3-8B's ffn_down: 1.2 GB each). torch's factorizations given a row-major
    ``out`` work on a column-major copy (one more n x n each, measured); given the column-major
    view of ``h``'s memory they work in it, so ``h`` is transposed in place into that layout and
    back, which moves values only: the bits of the copying calls. H goes to an unlinked
    temporary file first (the page cache, not this process's memory) so that a failed try
    restarts from it."""
    if not (damp > 0 and np.isfinite(damp)):
        raise SolverError(f"damping {damp:g}: must be a positive fraction of the mean Hessian diagonal")
    mean_diag = float(torch.diag(h).mean())
    f = _transpose_in_place(h).mT  # (n, n) H, Fortran-ordered in h's memory: what LAPACK reads
    buf = h.numpy()  # (n, n) the same memory
    info = torch.zeros((), dtype=torch.int32)
    with tempfile.TemporaryFile() as spill:
        buf.tofile(spill)
        for k in range(6):
            if k:  # H again, read straight into h
                spill.seek(0)
                spill.readinto(buf.data.cast("B"))
            tried = damp * 10**k
            f.diagonal().add_(tried * mean_diag)  # h + tried * mean_diag * I without an identity
            with one_thread():  # MKL's factorizations differ between thread counts
                torch.linalg.cholesky_ex(f, out=(f, info))  # lower factor L (upper triangle zeroed)
                if int(info) != 0:
                    continue
                torch.cholesky_inverse(f, out=f)  # H^-1 from L
                torch.linalg.cholesky_ex(f, upper=True, out=(f, info))
            if int(info) == 0:
                return _transpose_in_place(h), tried  # f's values, row-major
    raise SolverError(f"Hessian not positive definite even with damping {tried:g} x mean diagonal")


def _transpose_in_place(a: torch.Tensor, tile: int = 256) -> torch.Tensor:
    """``a`` (n, n) contiguous replaced by its transpose, tile by tile (one tile of memory more)."""
    n = a.shape[0]
    for i in range(0, n, tile):
        a[i : i + tile, i : i + tile] = a[i : i + tile, i : i + tile].T.clone()
        for j in range(i + tile, n, tile):
            upper = a[i : i + tile, j : j + tile].clone()
            a[i : i + tile, j : j + tile] = a[j : j + tile, i : i + tile].T
            a[j : j + tile, i : i + tile] = upper.T
    return a


def _float32_in_place(t: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """``t`` (contiguous float64) converted to float32 in its own memory, as ``t.to(float32)``:
    chunks in order, each read before its float32 values are written over float64 values at lower
    offsets, which were read already. Returns the float32 view; ``t`` holds garbage after."""
    src = t.view(-1)
    dst = src.view(torch.float32)[: src.numel()]
    for a in range(0, src.numel(), chunk):
        dst[a : a + chunk] = src[a : a + chunk].to(torch.float32)
    return dst.view(t.shape)


class _Grids:
    """Every sub-block's grid, by original column; fitted lazily at a group's first column (and
    released once its columns are done), or all up front (act-order's static groups). The decode
    tables are rows x codes floats per sub-block: kept for every group, Q6_K's for Qwen3-8B's
    ffn_down would be 1.6 GB (measured as the peak of its GPTQ stage)."""

    def __init__(self, target: Target, importance: np.ndarray) -> None:
        self.target, self.importance = target, importance
        self.fits: list[GroupFit] = []  # their levels dropped: pack reads only the raw bytes
        self.grids: dict[int, _Grid] = {}  # original column // sub -> grid

    def fit(self, g: np.ndarray, col: int) -> None:
        """Fit the group starting at original column ``col`` on ``g`` (rows, group)."""
        t = self.target
        fit = t.fit(np.ascontiguousarray(g, dtype=F32), self.importance[col : col + t.group])
        self.fits.append(replace(fit, levels=np.empty((0, 0, 0), F32)))
        for j, levels in enumerate(fit.levels):
            self.grids[col // t.sub + j] = _Grid.of(levels, t.unit)

    def release(self, col: int) -> None:
        """The grids of the group starting at original column ``col`` are no longer needed."""
        t = self.target
        for j in range(t.group // t.sub):
            self.grids.pop(col // t.sub + j, None)

    def pack(self, codes: np.ndarray) -> np.ndarray:
        """``codes`` (rows, cols) in original column order -> (rows, row_bytes) uint8."""
        g = self.target.group
        return np.concatenate(
            [self.target.pack(f, codes[:, k * g : (k + 1) * g]) for k, f in enumerate(self.fits)], axis=1
        )


def gptq(
    w: np.ndarray,
    h: np.ndarray,
    target: Target,
    damp: float = 0.01,
    block: int = 256,
    act_order: bool = False,
    overwrite: bool = False,
) -> GPTQResult:
    """Quantize ``w`` (rows, cols) to ``target`` with Hessian ``h`` (cols, cols) = sum of x x^T.

    ``act_order``: process columns by decreasing ``diag(h)``, on block scales fitted up front.
    ``overwrite``: ``h`` (float64) may be factorized in place instead of copied (its values are
    lost): one n x n float64 matrix in all, 1.2 GB for Qwen3-8B's ffn_down.
    The loop keeps the columns of a lazy batch as contiguous rows (``W1t``) and searches five
    codes per column; its results are those of the plain column loop, bit for bit.
    """
    rows, cols = w.shape
    group = target.group
    if cols % group:
        raise SolverError(f"{target.name}: {cols} columns are not a whole number of {group}-blocks")
    W = torch.from_numpy(np.array(w, dtype=F32))  # (rows, cols), updated in place
    if overwrite and h.dtype == np.float64 and h.flags.c_contiguous and h.flags.writeable:
        H = torch.from_numpy(h)
    else:
        H = torch.from_numpy(np.array(h, dtype=np.float64))
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    grids = _Grids(target, torch.diag(H).to(torch.float32).numpy())
    order = np.arange(cols)  # processing position -> original column
    if act_order:
        for col in range(0, cols, group):
            grids.fit(W[:, col : col + group].numpy(), col)
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H, order = W[:, perm], H[perm][:, perm], perm.numpy()
    upper, damp = _inverse_cholesky(H, damp)  # in H's memory
    Hinv = _float32_in_place(upper)  # (cols, cols) float32, still in H's memory
    del H, upper
    block = max(block // group, 1) * group
    codes_t = np.zeros((cols, rows), dtype=np.uint8)  # by original column
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        W1t = W[:, b0:b1].T.contiguous()  # (nb, rows): a column is a contiguous row
        W1t_np = W1t.numpy()
        Err1t = np.zeros_like(W1t_np)
        Q1t = np.empty_like(W1t_np)  # (nb, rows): the block's quantized columns
        Hinv1 = Hinv[b0:b1, b0:b1]
        diag = torch.diag(Hinv1).numpy()
        for i in range(b1 - b0):
            col = int(order[b0 + i])
            if not act_order and col % group == 0:
                if col:
                    grids.release(col - group)
                grids.fit(W1t_np[i : i + group].T, col)
            x = W1t_np[i]
            c, q = grids.grids[col // target.sub].nearest(x, target.unit, target.uniform)
            codes_t[col], Q1t[i] = c, q
            err = (x - q) / diag[i]
            Err1t[i] = err
            W1t[i + 1 :].sub_(Hinv1[i, i + 1 :, None] * torch.from_numpy(err))  # not -=: no copy back
        W[:, b1:] -= torch.from_numpy(Err1t).T.contiguous() @ Hinv[b0:b1, b1:]
        W[:, b0:b1] = torch.from_numpy(Q1t).T  # done with: W's columns become the result's
    if act_order:  # W's columns in processing order -> original order
        W = W[:, torch.from_numpy(np.argsort(order, kind="stable"))]
    return GPTQResult(data=grids.pack(codes_t.T), weights=W.numpy(), damp=damp)
