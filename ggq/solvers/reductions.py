"""Sums whose bits do not depend on the number of threads.

The solvers' decisions (GPTQ's rounding, AWQ's choice of scales and clips) rest on sums over
many terms, and a sum's last bits depend on the order of its additions. Measured on the CPU
build of torch (MKL, OpenMP): X^T X over 8192 tokens differs between 1 and 2 threads (MKL
splits the long inner dimension across its threads and adds the partial products), a full
``tensor.sum()`` over more than 32768 elements is split by the thread count, and MKL's Cholesky
and LU factorizations differ between 1, 2 and 4 threads even at n = 256. Products whose inner
dimension is short (a layer's forward, GPTQ's block update) and reductions over one dimension
(``mean(0)``: each output element is summed by one thread) gave the same bits at every count.

Here the long sums are taken in an order fixed by the data alone: :func:`gram` adds the
products of fixed chunks of rows in chunk order, each product on one BLAS thread (threads work
on different output columns), :func:`total` sums with numpy, and
:func:`one_thread` pins torch (and MKL) to one thread around a factorization.

Short products were thread-independent on the machines measured, and MKL's strict
reproducibility mode (ggq/__init__.py) is meant to keep them so, yet the fresh-clone CI found a
GPTQ file that differed between 1 and 2 threads from attn_output on (the first linear whose
input went through the layer's forward), on a machine whose CPU we do not know and in a failure
that no local run reproduced. So the solver no longer relies on MKL for this: a layer is solved
under :func:`fixed_order`, where torch runs on one thread and the products that carry the work
(:func:`mm`) are cut into fixed output tiles, each one single-threaded BLAS call, spread over
the caller's threads. Every bit then comes from one-thread kernels on shapes fixed by the data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

GRAM_ROWS = 1024  # rows per partial product of gram(): with GRAM_COLS, the order of its sums
GRAM_COLS = 128  # output columns per task of gram()
MM_COLS = 256  # output columns per task of mm() under fixed_order()

_FIXED: list[int] = []  # while fixed_order() is active: the thread counts its callers had


@contextmanager
def one_thread() -> Iterator[None]:
    """torch's intra-op threads (OpenMP and MKL, process-wide) set to 1, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threads() -> int:
    """Threads for fixed-shape tasks: the caller's count under :func:`fixed_order`, else torch's."""
    return _FIXED[-1] if _FIXED else torch.get_num_threads()


@contextmanager
def fixed_order() -> Iterator[None]:
    """torch on one thread (OpenMP and MKL), its former thread count kept for the fixed-shape tasks
    of :func:`gram`, :func:`mm` and GPTQ's factorization (:func:`threads`); nests."""
    n = threads()
    with one_thread():
        _FIXED.append(n)
        try:
            yield
        finally:
            _FIXED.pop()


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` (..., k) @ ``b`` (k, n). Under :func:`fixed_order` on the CPU (and without autograd)
    the output's columns are cut into MM_COLS-wide tiles, each one product on one BLAS thread,
    run on :func:`threads` Python threads (the products release the GIL): the bits are those of
    one thread on tiles the shapes alone fix, whatever the thread count. Otherwise ``a @ b``."""
    n = b.shape[-1]
    plain = not _FIXED or a.device.type != "cpu" or b.dim() != 2 or n <= MM_COLS
    if plain or (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
        return a @ b
    flat = a.reshape(-1, a.shape[-1])  # (rows, k)
    out = torch.empty(flat.shape[0], n, dtype=torch.promote_types(a.dtype, b.dtype))

    def tile(j0: int, j1: int) -> None:
        out[:, j0:j1] = flat @ b[:, j0:j1]

    _column_tiles(tile, n)
    return out.view(*a.shape[:-1], n)


def _column_tiles(fn: Callable[[int, int], None], n: int) -> None:
    """``fn(j0, j1)`` for each MM_COLS-wide tile of n columns, on the caller's :func:`threads`
    (fixed_order's count) Python threads, torch on one thread in each."""
    tiles = [(j, min(j + MM_COLS, n)) for j in range(0, n, MM_COLS)]
    workers = max(1, min(_FIXED[-1], len(tiles)))
    if workers == 1:
        for t in tiles:
            fn(*t)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda t: fn(*t), tiles))


def mm_add(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``c`` (m, n) += ``a`` (m, k) @ ``b`` (k, n), in place. Under :func:`fixed_order` on the CPU
    (without autograd) as :func:`mm`'s tiles, each one BLAS call adding its product into its
    columns of ``c`` (no (m, n) temporary, no separate pass of one thread over ``c``)."""
    n = b.shape[-1]
    plain = not _FIXED or c.device.type != "cpu" or n <= MM_COLS
    if plain or (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
        c += a @ b
        return

    def tile(j0: int, j1: int) -> None:
        c[:, j0:j1].addmm_(a, b[:, j0:j1])

    _column_tiles(tile, n)


def gram(
    x: torch.Tensor,
    dtype: torch.dtype = torch.float64,
    into: torch.Tensor | None = None,
    upper: bool = False,
) -> torch.Tensor:
    """sum over the rows r of ``x`` (..., n) of r^T r: (n, n) float64 on x's device.
    ``into``: an earlier gram() result the products are added to, in place, and returned (rows
    given in pieces of whole GRAM_ROWS chunks then sum to gram() of all of them, bit for bit).
    ``upper``: on the CPU only the upper triangle (with the diagonal blocks) is summed, about half
    the products; the rest of the result is left as it was (zeros) until :func:`mirror_upper`.

    The rows are taken GRAM_ROWS at a time, each chunk's product computed in ``dtype`` and the
    products added in float64 in chunk order. On the CPU the output is cut into column blocks of
    GRAM_COLS, one task each, run on :func:`threads` Python threads (the products
    release the GIL) with every product on one BLAS thread: the parallelism stays, the bits are
    those of one thread. On another device the chunks run one after the other on its stream.
    """
    flat = x.reshape(-1, x.shape[-1])  # (rows, n)
    rows, n = flat.shape
    acc = into if into is not None else torch.zeros(n, n, dtype=torch.float64, device=flat.device)
    cpu = flat.device.type == "cpu"
    blocks = [(j, min(j + GRAM_COLS, n)) for j in range(0, n, GRAM_COLS)] if cpu else [(0, n)]
    workers = max(1, min(threads(), len(blocks)))
    with one_thread() if cpu else nullcontext(), ThreadPoolExecutor(workers) as pool:
        for start in range(0, rows, GRAM_ROWS):
            c = flat[start : start + GRAM_ROWS].to(dtype)  # (chunk, n): converted once, read by every task

            def columns(b: tuple[int, int], c: torch.Tensor = c) -> None:  # acc's columns b[0]..b[1]
                top = b[1] if upper else n  # rows of acc: above the diagonal block's end, or all
                acc[:top, b[0] : b[1]] += (c[:, :top].T @ c[:, b[0] : b[1]]).to(torch.float64)

            list(pool.map(columns, blocks[::-1] if upper else blocks))  # the largest tasks first
    return acc


def mirror_upper(a: torch.Tensor, tile: int = 1024) -> torch.Tensor:
    """``a`` (n, n): its strict lower triangle replaced by the upper one's transpose, in place,
    a tile at a time (a symmetric matrix from gram(upper=True))."""
    n = a.shape[0]
    for i in range(0, n, tile):
        d = a[i : i + tile, i : i + tile]
        d.copy_(torch.triu(d) + torch.triu(d, 1).T)
        for j in range(i + tile, n, tile):
            a[j : j + tile, i : i + tile] = a[i : i + tile, j : j + tile].T
    return a


def total(t: torch.Tensor) -> float:
    """The sum of every element of ``t`` (..., n) in float64, by numpy (pairwise, on one thread);
    on another device each row is summed there (a reduction over rows is split by rows, never
    within one) and numpy adds the row sums."""
    if t.device.type == "cpu":
        return float(np.sum(t.detach().numpy(), dtype=np.float64))
    rows = t.reshape(-1, t.shape[-1]).sum(dim=-1, dtype=torch.float64)  # (rows,): one row per thread
    return float(np.sum(rows.cpu().numpy()))
