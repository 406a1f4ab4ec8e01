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

import itertools
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch

from ggq import ggml
from ggq.solvers.options import SolverError, supported_types, timed
from ggq.solvers.reductions import mm, mm_add, one_thread, threads

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
class Factor:
    """What GPTQ derives from H alone, for every linear reading the same input (q/k/v, gate/up):
    the factor of _upper_factor and what the loop reads of H besides it."""

    m: torch.Tensor  # (n, n) float32: H (processing order, damped) = M M^T, upper triangle meaningful
    d: torch.Tensor  # (n,) M's diagonal
    importance: np.ndarray  # (n,) float32 H's diagonal (original order, dead channels 1): the group fits'
    dead: np.ndarray  # (n,) bool: channels with a zero diagonal (their weights are taken as 0)
    perm: np.ndarray | None  # act-order's processing order, None without
    requested: float  # the damping asked for
    damp: float  # the damping it took


@dataclass(frozen=True)
class GPTQResult:
    data: np.ndarray  # (rows, row_bytes) uint8: the tensor as written to the GGUF
    weights: np.ndarray  # (rows, cols) float32: the values llama.cpp dequantizes from ``data``
    damp: float  # the damping used: the requested one, or raised until H was positive definite
    factor: Factor | None = None  # H's factor, for another linear on the same H (None: legacy)


def _upper_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """H = M M^T with M (n, n) upper triangular, computed in ``h``'s memory (row-major float64:
    converted in place to float32, whose view is returned), and the damping it took (raised x10
    until H is positive definite, _tries). GPTQ's U (upper, U^T U = H^-1) is M^-1, which the loop
    never needs: its feedback reads M (gptq). Only M's upper triangle is meaningful after
    (_m_rows reads no more).

    Blocked from the bottom-right corner, FACTOR_BLOCK columns at a time: with H = [[A, B],
    [B^T, C]] and C = M_c M_c^T done, M's block above it is B M_c^-T and A - (B M_c^-T)(B M_c^-T)^T
    is what is left. Each diagonal block is factorized on one thread (J C J = L L^T, M_c = J L J,
    J the reversal); the panel solves and the updates of the upper triangle's tiles are tasks of
    fixed shapes run on threads() Python threads, each on one BLAS thread: parallel,
    with the bits of one thread (reductions.py). A failed try restarts from a copy of H: its
    float32 values, kept in the second half of ``h``'s memory (free once converted).

    In float32, as GPTQ's reference code factorizes: the feedback the loop reads is float32
    anyway (_m_rows), and float32 halves the memory and more than triples the speed (Qwen3-8B's
    ffn_down, n = 12288, on 2 cores: 17.3 s in float64, 4.8 s in float32, one timing of this
    function alone, not yet tools/bench_solver.py's per-layer run); the damping
    keeps H far from float32's singular range (singular ones: _tries)."""
    if not (damp > 0 and np.isfinite(damp)):
        raise SolverError(f"damping {damp:g}: must be a positive fraction of the mean Hessian diagonal")
    mean_diag = float(torch.diag(h).mean())
    assert h.dtype == torch.float64 and h.is_contiguous()  # gptq() gives its own float64 H
    full = h.view(-1)
    h = _float32_in_place(h)  # factorized in float32, in the first half of h's memory
    kept = full.view(torch.float32)[h.numel() :].view(h.shape)  # H again, in the second half
    kept.copy_(h)
    for k in range(_tries(damp)):
        if k:
            h.copy_(kept)
        tried = damp * 10**k
        h.diagonal().add_(tried * mean_diag)  # H + tried * mean_diag * I without an identity
        if _factor_in_place(h):
            return h, tried
    raise SolverError(f"Hessian not positive definite even with damping {tried:g} x mean diagonal")


FACTOR_BLOCK = 512  # columns per diagonal block (and rows/columns per tile) of _factor_in_place


def _factor_in_place(h: torch.Tensor) -> bool:
    """_upper_factor's blocked factorization of ``h`` (n, n), in place; False where a diagonal
    block is not positive definite (``h`` is then garbage)."""
    n = h.shape[0]
    edges = [*range(0, n, FACTOR_BLOCK), n]
    tiles = list(itertools.pairwise(edges))
    workers = max(1, threads())
    with one_thread(), ThreadPoolExecutor(workers) as pool:
        for k in range(len(tiles) - 1, -1, -1):
            a, c = tiles[k]
            blk = h[a:c, a:c]
            sym = torch.triu(blk) + torch.triu(blk, 1).T  # the upper triangle is the one kept up to date
            low, info = torch.linalg.cholesky_ex(sym.flip(0, 1))  # J C J = L L^T
            if int(info) != 0:
                return False
            m_c = low.flip(0, 1)  # (b, b) upper: C = M_c M_c^T
            blk.copy_(m_c)
            above = tiles[:k]

            def panel(t: tuple[int, int], a: int = a, c: int = c, m_c: torch.Tensor = m_c) -> None:
                rows = h[t[0] : t[1], a:c]  # B's rows -> B M_c^-T (X M_c^T = B)
                rows.copy_(torch.linalg.solve_triangular(m_c.T, rows, upper=False, left=False))

            list(pool.map(panel, above))

            def update(ij: tuple[tuple[int, int], tuple[int, int]], a: int = a, c: int = c) -> None:
                (i0, i1), (j0, j1) = ij
                h[i0:i1, j0:j1] -= h[i0:i1, a:c] @ h[j0:j1, a:c].T

            list(pool.map(update, [(ti, tj) for x, ti in enumerate(above) for tj in above[x:]]))
    return True


def _tries(damp: float) -> int:
    """How many dampings damp x 10^k the factorization tries: six, or up to the mean diagonal
    itself when that takes more. The float32 chunk products of X^T X leave a singular H (fewer
    tokens than columns) indefinite by about float32's epsilon x its norm, which a damping far
    below that (``--damp 1e-16``) cannot fix in five raises."""
    return max(6, int(np.ceil(-np.log10(damp))) + 1) if damp < 1 else 6


# Columns whose feedback into each other _loop applies one column at a time (each column's update
# touches at most INNER - 1 rows of the batch); into the batch's later columns it is one product
# per INNER columns. A divisor of every ggml block size (32, 256), so that a group's first column
# starts an inner batch whose columns have every earlier column's feedback.
INNER = 32
SOLVE_COLS = 1024  # rows of W per task of _textbook_state's triangular solve


def _m_rows(m: torch.Tensor, d: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
    """Rows b0..b1 of M / diag(M) from columns b0 on, (b1 - b0, n - b0) float32: ``m`` the
    factor as _upper_factor leaves it, ``d`` (n,) M's diagonal. N[i, j] = M[i, j] / M[j, j]
    is the feedback of column i's error into column j (unit diagonal; below it zeros)."""
    rows = torch.triu(m[b0:b1, b0:])  # (b1 - b0, n - b0) M[b0:b1, b0:], a copy
    return (rows / d[b0:]).to(torch.float32)


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
    h: np.ndarray | None,
    target: Target,
    damp: float = 0.01,
    block: int = 256,
    act_order: bool = False,
    overwrite: bool = False,
    legacy: bool = False,
    factor: Factor | None = None,
) -> GPTQResult:
    """Quantize ``w`` (rows, cols) to ``target`` with Hessian ``h`` (cols, cols) = sum of x x^T.

    ``act_order``: process columns by decreasing ``diag(h)``, on block scales fitted up front.
    ``overwrite``: ``h`` (float64) may be factorized in place instead of copied (its values are
    lost): one n x n float64 matrix in all, 1.2 GB for Qwen3-8B's ffn_down.
    ``factor``: the result's ``factor`` of an earlier call on the same H, damping and act-order
    (``h`` is then not read and may be None): the same bytes as factorizing H again.
    The loop keeps the columns of a lazy batch as contiguous rows (``W1t``) and searches five
    codes per column.

    The error feedback is GPTQ's in either form. With H = M M^T (M upper, one blocked Cholesky
    factorization from the bottom-right corner, _upper_factor) column j is rounded at w0_j + sum_{i<j} (w0_i - q_i)
    M[i, j] / M[j, j], w0 the weights given: the textbook's w_j after its feedback through
    U = M^-1 (U^T U = H^-1), since W0 - Q = E U for its scaled errors E. ``legacy``
    (SolverOptions.legacy_gptq): the textbook form on U from chol(H), its inverse and chol(H^-1)
    (three factorizations, ~4x the flops; issue 13's code before its part 3).
    """
    rows, cols = w.shape
    group = target.group
    if cols % group:
        raise SolverError(f"{target.name}: {cols} columns are not a whole number of {group}-blocks")
    if factor is not None:
        if legacy or factor.requested != damp or (factor.perm is not None) != act_order:
            raise ValueError("gptq: a factor is reused only with the damping and act-order it was made with")
        H = None
        dead_np, importance, perm_np = factor.dead, factor.importance, factor.perm
    else:
        assert h is not None
        if overwrite and h.dtype == np.float64 and h.flags.c_contiguous and h.flags.writeable:
            H = torch.from_numpy(h)
        else:
            H = torch.from_numpy(np.array(h, dtype=np.float64))
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        dead_np, importance = dead.numpy(), torch.diag(H).to(torch.float32).numpy()
        perm_np = torch.argsort(torch.diag(H), descending=True, stable=True).numpy() if act_order else None
    grids = _Grids(target, importance)
    w0 = np.asarray(w, dtype=F32)  # (rows, cols) the weights given: read, never written
    if bool(dead_np.any()):
        w0 = w0.copy()
        w0[:, dead_np] = 0.0
    W = torch.from_numpy(w0.copy())  # (rows, cols), updated in place
    order = np.arange(cols)  # processing position -> original column
    if perm_np is not None:
        for col in range(0, cols, group):
            grids.fit(W[:, col : col + group].numpy(), col)
        perm = torch.from_numpy(perm_np)
        W, order = W[:, perm], perm_np
        if H is not None:
            H = H[perm][:, perm]
    block = max(block // group, 1) * group
    codes_t = np.zeros((cols, rows), dtype=np.uint8)  # by original column
    if legacy:
        assert H is not None
        damp = _loop_legacy(W, H, w0, order, grids, codes_t, damp, block, act_order)
        made = None
    else:
        if factor is None:
            assert H is not None
            m, took = _upper_factor(H, damp)  # in H's memory
            factor = Factor(m, torch.diag(m).clone(), importance, dead_np, perm_np, damp, took)
        _loop(W, factor.m, factor.d, w0, order, grids, codes_t, block, act_order)
        damp, made = factor.damp, factor
    if act_order:  # W's columns in processing order -> original order
        W = W[:, torch.from_numpy(np.argsort(order, kind="stable"))]
    return GPTQResult(data=grids.pack(codes_t.T), weights=W.numpy(), damp=damp, factor=made)


def _column(grids: _Grids, x: np.ndarray, col: int, codes_t: np.ndarray) -> np.ndarray:
    """Round column ``x`` (rows,), original column ``col``, to its block's nearest values;
    records the codes and returns the values (rows,)."""
    t = grids.target
    c, q = grids.grids[col // t.sub].nearest(x, t.unit, t.uniform)
    codes_t[col] = c
    return q


def _start_group(grids: _Grids, g: np.ndarray, col: int) -> None:
    """Without act-order a group's scales are fitted at its first column (original ``col``) on
    its columns as they are then, ``g`` (rows, group); the previous group's tables go."""
    if col:
        grids.release(col - grids.target.group)
    grids.fit(g, col)


def _textbook_state(c: torch.Tensor, w0: np.ndarray, N: torch.Tensor, i: int) -> np.ndarray:
    """A group's columns as textbook GPTQ has them at the group's first column, (rows, group):
    from ``c`` (group, rows), their values in _loop's form (w0 + the feedback D N of the columns
    before), ``w0`` (group, rows) the given ones and ``N`` the batch's feedback rows, the group's
    first at row ``i``. The textbook's are w0 + D M12 M22^-1 over the columns left (H12 H22^-1,
    the optimal compensation), whose group columns need only the group's own block of M:
    w0 + (c - w0) N_gg^-1, N_gg (group, group) unit upper triangular."""
    g = c.shape[0]
    w0t = torch.from_numpy(w0)
    n_gg = N[i : i + g, i : i + g].T  # (g, g) unit lower: its upper triangle is not read
    fix = c - w0t  # (g, rows), solved in place

    def solve(t: tuple[int, int]) -> None:  # rows t[0]..t[1]: one task, one BLAS thread
        part = fix[:, t[0] : t[1]]
        part.copy_(torch.linalg.solve_triangular(n_gg, part, upper=False, unitriangular=True))

    # MKL's multi-threaded triangular solve: bits vary with its partition (CI), so fixed-width
    # tiles of the rows, each on one thread, run on threads() Python threads
    rows = fix.shape[1]
    tiles = [(j, min(j + SOLVE_COLS, rows)) for j in range(0, rows, SOLVE_COLS)]
    with one_thread(), ThreadPoolExecutor(max(1, min(threads(), len(tiles)))) as pool:
        list(pool.map(solve, tiles))
    return (w0t + fix).numpy().T


def _loop(
    W: torch.Tensor,
    m: torch.Tensor,
    d: torch.Tensor,
    w0: np.ndarray,
    order: np.ndarray,
    grids: _Grids,
    codes_t: np.ndarray,
    block: int,
    act_order: bool,
) -> None:
    """GPTQ's columns on the factor ``m`` of H = M M^T (_upper_factor; ``d`` its diagonal):
    ``W`` (rows, cols) in processing order is updated in place to the quantized weights."""
    cols, group = W.shape[1], grids.target.group
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        N = _m_rows(m, d, b0, b1)  # (nb, cols - b0) float32 feedback rows
        W1t = W[:, b0:b1].T.contiguous()  # (nb, rows): a column is a contiguous row
        W1t_np = W1t.numpy()
        W0t = np.ascontiguousarray(w0[:, order[b0:b1]].T)  # (nb, rows) the given weights
        D1t = np.empty_like(W1t_np)  # (nb, rows): w0 - q of the block's columns
        Q1t = np.empty_like(W1t_np)  # (nb, rows): the block's quantized columns
        nb = b1 - b0
        for s0 in range(0, nb, INNER):  # INNER columns at a time; their feedback to the rest: one product
            s1 = min(s0 + INNER, nb)
            for i in range(s0, s1):
                col = int(order[b0 + i])
                if not act_order and col % group == 0:
                    _start_group(grids, _textbook_state(W1t[i : i + group], W0t[i : i + group], N, i), col)
                Q1t[i] = _column(grids, W1t_np[i], col, codes_t)
                np.subtract(W0t[i], Q1t[i], out=D1t[i])
                W1t[i + 1 : s1].add_(N[i, i + 1 : s1, None] * torch.from_numpy(D1t[i]))  # fixed roundings
            if s1 < nb:
                mm_add(W1t[s1:], N[s0:s1, s1:nb].T.contiguous(), torch.from_numpy(D1t[s0:s1]))
        mm_add(W[:, b1:], torch.from_numpy(D1t).T.contiguous(), N[:, nb:])  # the rest's feedback
        W[:, b0:b1] = torch.from_numpy(Q1t).T  # done with: W's columns become the result's


def _loop_legacy(
    W: torch.Tensor,
    H: torch.Tensor,
    w0: np.ndarray,
    order: np.ndarray,
    grids: _Grids,
    codes_t: np.ndarray,
    damp: float,
    block: int,
    act_order: bool,
) -> float:
    """The textbook loop on U, the upper Cholesky factor of H^-1 (the code before issue 13's
    part 3, bit for bit)."""
    cols, group = W.shape[1], grids.target.group
    upper, damp = _inverse_cholesky(H, damp)  # in H's memory
    Hinv = _float32_in_place(upper)  # (cols, cols) float32, still in H's memory
    del H, upper
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
                _start_group(grids, W1t_np[i : i + group].T, col)
            x = W1t_np[i]
            Q1t[i] = q = _column(grids, x, col, codes_t)
            err = (x - q) / diag[i]
            Err1t[i] = err
            W1t[i + 1 :].sub_(Hinv1[i, i + 1 :, None] * torch.from_numpy(err))  # not -=: no copy back
        W[:, b1:] -= mm(torch.from_numpy(Err1t).T.contiguous(), Hinv[b0:b1, b1:])
        W[:, b0:b1] = torch.from_numpy(Q1t).T  # done with: W's columns become the result's
    return damp
