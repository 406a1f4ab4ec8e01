"""AWQ: activation-aware per-channel scales, searched with the target ggml block quantizer in the
loop, folded exactly into the model (Lin et al., 2023).

A linear's output ``X W^T`` is unchanged when input channel j is divided by s_j and weight
column j multiplied by s_j. Where the division can be absorbed by the tensor that produces X (an
RMSNorm weight, or the rows of a linear with nothing non-linear before the consumer), the model
computes the same function, but the quantizer sees ``W * s``: the columns of salient channels
(large mean |x|) are magnified and keep more relative precision. The scales are
``s = mean|x| ** alpha`` (normalised), alpha picked on a grid to minimise the output error of all
the linears reading X, each quantized with its own ggml block type and the importance (mean
square) of the scaled input, as the final encoder will quantize it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ggq import ggml
from ggq.solvers.options import timed
from ggq.solvers.reductions import gram, mm, one_thread, total


@dataclass(frozen=True)
class ScaleGroup:
    """Channels produced by ``prev`` and read by ``linears``: one AWQ scale per channel."""

    prev: str  # RMSNorm weight (n,) or linear (n, n_in) whose output rows are divided by s
    linears: tuple[str, ...]  # linears (n_out, n) whose columns are multiplied by s
    gqa: bool = False  # prev is attn_v: a channel serves the query heads of its KV group


# Qwen3 (GGUF short names): which tensor's output feeds which linears, with only the linear map
# in between. q/k pass through QK-norm, so only v -> o is foldable inside attention.
QWEN3_GROUPS = (
    ScaleGroup("attn_norm", ("attn_q", "attn_k", "attn_v")),
    ScaleGroup("attn_v", ("attn_output",), gqa=True),
    ScaleGroup("ffn_norm", ("ffn_gate", "ffn_up")),
    ScaleGroup("ffn_up", ("ffn_down",)),
)


def channel_map(group: ScaleGroup, n_in: int, n_head: int, n_head_kv: int, head_dim: int) -> np.ndarray:
    """(n_in,) index of the scale of each input column of the group's linears."""
    if not group.gqa:
        return np.arange(n_in)
    col = np.arange(n_head * head_dim)  # attn_output column (h, d) = h * head_dim + d
    head, d = col // head_dim, col % head_dim
    return (head // (n_head // n_head_kv)) * head_dim + d  # v channel (h // group, d)


def fold(w: dict[str, torch.Tensor], group: ScaleGroup, scales: torch.Tensor, channel: np.ndarray) -> None:
    """Divide ``prev``'s output channels by ``scales`` and multiply the linears' columns by them."""
    prev = w[group.prev]
    w[group.prev] = prev / scales if prev.ndim == 1 else prev / scales[:, None]
    cols = scales[torch.from_numpy(channel)]  # (n_in,)
    for name in group.linears:
        w[name] = w[name] * cols[None, :]


def candidate_scales(x_mean: np.ndarray, w_mean: np.ndarray | None, alpha: float) -> np.ndarray:
    """AWQ's ``mean|x| ** alpha``, or with ``w_mean`` ``mean|x| ** alpha / mean|w| ** (1 - alpha)``
    (AutoAWQ's duo scaling), normalised so that max * min = 1."""
    s = np.maximum(x_mean.astype(np.float64), 1e-8) ** alpha
    if w_mean is not None:
        s = s / (np.maximum(w_mean.astype(np.float64), 1e-8) ** (1 - alpha))
    s = np.maximum(s / s.max(), 1e-4)  # bound the ratio of scales (dead channels)
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


def quantized_weights(w: np.ndarray, type_name: str, importance: np.ndarray | None) -> np.ndarray:
    """What llama.cpp decodes after encoding ``w`` (rows, cols) in ``type_name``."""
    with timed("encode"):
        return ggml.dequantize(ggml.quantize(w, type_name, importance, n_threads=0), type_name, w.shape[1])


@dataclass(frozen=True)
class ScaleResult:
    scales: np.ndarray  # (n_channels,) float32: prev / scales, linear columns * scales[channel]
    exponents: tuple[float, float]  # of mean|x| and of 1 / mean|w|: (0, 0) = no scaling
    loss: float  # sum over the linears of ||X (W - Q)^T||^2 with these scales
    loss_plain: float  # the same unscaled: importance-weighted RTN


def output_error(
    weights: list[tuple[np.ndarray, str]], h: torch.Tensor, mean_sq: np.ndarray, cols: np.ndarray
) -> float:
    """sum_i ||X (W_i - Q(W_i * cols) / cols)^T||^2 from H = X^T X (on any device), with the
    quantizer's importance the mean square of the scaled input X / cols."""
    loss = 0.0
    for e in _weight_errors(weights, mean_sq, cols, h.device):
        loss += total(mm(e, h) * e)
    return loss


def _weight_errors(
    weights: list[tuple[np.ndarray, str]], mean_sq: np.ndarray, cols: np.ndarray, device: torch.device
) -> Iterator[torch.Tensor]:
    """Per linear, ``W - Q(W * cols) / cols`` (rows, n_in) on ``device``: what the block quantizer
    loses under the column scales ``cols``, importance the mean square of the scaled input."""
    importance = (mean_sq / cols**2).astype(np.float32)
    for w, type_name in weights:
        q = quantized_weights(w * cols[None, :], type_name, importance) / cols[None, :]
        yield torch.from_numpy(w - q).to(device)


def column_errors(
    weights: list[tuple[np.ndarray, str]], h: torch.Tensor, mean_sq: np.ndarray, cols: np.ndarray
) -> np.ndarray:
    """(n_in,) float64 share of each input column in :func:`output_error`: sum over the linears'
    rows of e * (e H), which adds up to the output error (cross-column terms included; summed
    in another order, so the last bits may differ)."""
    per_col = np.zeros(len(cols), np.float64)
    for e in _weight_errors(weights, mean_sq, cols, h.device):
        per_col += (mm(e, h) * e).sum(0, dtype=torch.float64).cpu().numpy()  # one thread per column
    return per_col


def _per_channel(values: np.ndarray, channel: np.ndarray) -> np.ndarray:
    """Mean of per-column ``values`` over the columns sharing a scale."""
    n_ch = int(channel.max()) + 1
    return np.bincount(channel, weights=values, minlength=n_ch) / np.bincount(channel, minlength=n_ch)


def search_scales(
    weights: list[tuple[np.ndarray, str]],
    h: torch.Tensor,
    mean_abs: np.ndarray,
    mean_sq: np.ndarray,
    channel: np.ndarray,
    grid: int = 20,
) -> ScaleResult:
    """Best scales for linears (rows, n_in), each of a ggml type, reading one input: ``h``
    (n_in, n_in) sum of x x^T, ``mean_abs`` / ``mean_sq`` (n_in,) of x, ``channel`` (n_in,) the
    scale index of each column. Candidates: alpha in {0, 1/grid, ..., 1}, with and without the
    weights' mean magnitude; ties keep the earlier (unscaled first)."""
    return ranked_scales(weights, h, mean_abs, mean_sq, channel, grid)[0]


def ranked_scales(
    weights: list[tuple[np.ndarray, str]],
    h: torch.Tensor,
    mean_abs: np.ndarray,
    mean_sq: np.ndarray,
    channel: np.ndarray,
    grid: int = 20,
    rows: int = 0,
) -> list[ScaleResult]:
    """Every candidate of :func:`search_scales`, by increasing output error (ties: the earlier
    first, the unscaled one before all). ``rows`` (0: all): each linear's error is scored on
    every ``its rows // rows``-th row (sample_rows); the candidates come from all of them."""
    x_mean = _per_channel(mean_abs, channel)
    w_mean = _per_channel(row_relative_mean([w for w, _ in weights]), channel)  # (n_ch,)
    scored = [(sample_rows(w, rows), t) for w, t in weights]
    plain = output_error(scored, h, mean_sq, np.ones(len(channel), np.float32))
    grid_ = grid_candidates(x_mean, w_mean, grid)
    found = [ScaleResult(*grid_[0], plain, plain)]  # unscaled: importance-weighted RTN
    for s, exponents in grid_[1:]:
        found.append(ScaleResult(s, exponents, output_error(scored, h, mean_sq, s[channel]), plain))
    return sorted(found, key=lambda r: r.loss)  # stable: ties keep the earlier


def sample_rows(w: np.ndarray, rows: int) -> np.ndarray:
    """Every ``len(w) // rows``-th row of ``w`` (rows, n_in), contiguous; ``w`` itself under
    2 x ``rows`` rows or with ``rows`` 0. ggml encodes each row on its own (the importance is per
    column), so a sampled row's quantization is the whole matrix's: the output error summed over
    the sample is that of those rows exactly, an evenly spread share of the whole."""
    stride = max(1, w.shape[0] // rows) if rows else 1
    return w if stride == 1 else np.ascontiguousarray(w[::stride])


def row_relative_mean(weights: list[np.ndarray]) -> np.ndarray:
    """(n_in,) float64 mean over every row of the linears (rows, n_in) of |w| / the row's max |w|:
    the duo candidates' mean weight magnitude."""
    w_rel = np.concatenate([np.abs(w) / np.abs(w).max(1, keepdims=True).clip(1e-12) for w in weights])
    return w_rel.mean(0).astype(np.float64)


def grid_candidates(
    x_mean: np.ndarray, w_mean: np.ndarray, grid: int = 20
) -> list[tuple[np.ndarray, tuple[float, float]]]:
    """AWQ's scale grid, (scales, exponents of mean|x| and of 1 / mean|w|), unscaled first: alpha
    in {1/grid, ..., 1} on mean|x| alone, then {0, ..., (grid - 1)/grid} with ``w_mean`` (duo)."""
    found = [(np.ones(len(x_mean), np.float32), (0.0, 0.0))]
    for duo in (False, True):
        for k in range(1, grid + 1) if not duo else range(grid):
            alpha = k / grid
            s = candidate_scales(x_mean, w_mean if duo else None, alpha)
            found.append((s, (alpha, 1 - alpha if duo else 0.0)))
    return found


def block_choice(
    candidates: list[ScaleResult],
    weights: list[tuple[np.ndarray, str]],
    mean_sq: np.ndarray,
    channel: np.ndarray,
    block_error: Callable[[list[torch.Tensor]], float],
) -> ScaleResult:
    """The candidate whose quantized linears give the least ``block_error``: the error of the
    output of the block they are part of (through its non-linearities), given each linear's
    ``Q(W * cols) / cols`` (rows, n_in) in ``weights``' order. Ties keep the earlier."""
    best, best_err = candidates[0], math.inf
    for c in candidates:
        cols = c.scales[channel]
        importance = (mean_sq / cols**2).astype(np.float32)
        qs = [
            torch.from_numpy(quantized_weights(w * cols[None, :], t, importance) / cols[None, :])
            for w, t in weights
        ]
        err = block_error(qs)
        if err < best_err:
            best, best_err = c, err
    return best


def clipped_choice(
    candidates: list[ScaleResult],
    weights: list[tuple[np.ndarray, str]],
    h: torch.Tensor,
    mean_sq: np.ndarray,
    channel: np.ndarray,
    grid: int = 20,
) -> ScaleResult:
    """Scales and clipping searched jointly: the candidate with the least output error once each
    linear is clipped (:func:`clip_search` with ``grid`` steps, in the scaled space, as the
    encoder will see it) and quantized. Ties keep the earlier; the result's ``loss`` is its
    clipped error."""
    best: ScaleResult | None = None
    for c in candidates:
        cols = c.scales[channel]
        ct = torch.from_numpy(cols).to(h.device)
        hs = h / ct[:, None] / ct[None, :]  # (n_in, n_in) X^T X of the scaled input X / cols
        importance = (mean_sq / cols**2).astype(np.float32)
        loss = 0.0
        for w, t in weights:
            ws = w * cols[None, :]
            e = ws - quantized_weights(clip_search(ws, t, importance, hs, grid), t, importance)
            et = torch.from_numpy(e).to(h.device)
            loss += total(mm(et, hs) * et)
        if best is None or loss < best.loss:
            best = ScaleResult(c.scales, c.exponents, loss, c.loss_plain)
    assert best is not None
    return best


def refine_scales(
    weights: list[tuple[np.ndarray, str]],
    h: torch.Tensor,
    mean_sq: np.ndarray,
    channel: np.ndarray,
    start: ScaleResult,
    steps: tuple[float, ...] = (1.2, 1.1),
    stride: int = 4,
    unit: int = 32,
) -> ScaleResult:
    """Per-channel coordinate descent from the grid's best scales, the block quantizer in the loop.

    A sweep per factor g in ``steps``: the channels are split into ``stride`` interleaved sets
    (every ``unit`` columns hold ``unit / stride`` columns of a set). A set's scales are tried
    times g and divided by g; a channel takes the better trial when it lowers the output error of
    the ``unit``-column blocks holding its columns (column_errors: the blocks' shares, cross-block
    terms included, split evenly among the moved columns of a block). The set's moves are kept
    only when the whole output error falls, so the result is never worse than ``start``."""
    n_in = len(channel)
    if n_in % unit:
        return start
    n_ch = len(start.scales)
    unit_of = np.arange(n_in) // unit  # (n_in,)
    s = start.scales.astype(np.float64)
    cur = column_errors(weights, h, mean_sq, s[channel].astype(np.float32))
    loss = float(np.sum(cur))
    for g in steps:
        for k in range(stride):
            trial_set = np.arange(n_ch) % stride == k  # (n_ch,)
            moved = trial_set[channel]  # (n_in,) the columns whose scale moves
            in_unit = np.bincount(unit_of, weights=moved.astype(np.float64))[unit_of]
            base = np.bincount(unit_of, weights=cur)
            gains = []
            for f in (g, 1 / g):
                err = column_errors(
                    weights, h, mean_sq, np.where(trial_set, s * f, s)[channel].astype(np.float32)
                )
                share = np.where(
                    moved, (np.bincount(unit_of, weights=err) - base)[unit_of] / in_unit.clip(1), 0.0
                )
                gains.append(np.bincount(channel, weights=share, minlength=n_ch))  # (n_ch,)
            up = gains[0] <= gains[1]
            factor = np.where(trial_set & (np.minimum(gains[0], gains[1]) < 0), np.where(up, g, 1 / g), 1.0)
            if np.all(factor == 1.0):
                continue
            t = s * factor
            err = column_errors(weights, h, mean_sq, t[channel].astype(np.float32))
            if float(np.sum(err)) < loss:
                s, cur, loss = t, err, float(np.sum(err))
    found = s.astype(np.float32)
    final = output_error(weights, h, mean_sq, found[channel])  # the grid's measure of the same error
    if final >= start.loss:
        return start
    return ScaleResult(found, start.exponents, final, start.loss_plain)


def refit_norm(
    pairs: list[tuple[np.ndarray, np.ndarray]], h: torch.Tensor, ridge: float = 1e-3
) -> np.ndarray:
    """Per-input-channel factors u (n_in,) minimising sum_i ||X W_i^T - X diag(u) Q_i^T||^2 over the
    pairs (W_i, Q_i) (rows, n_in) of weights and their quantized values: a linear least squares,
    (sum_i H o Q_i^T Q_i) u = sum_i diag(Q_i^T W_i H). When X comes out of an RMSNorm, multiplying
    the norm's weight by u applies it exactly; ``ridge`` (relative) pulls u towards 1."""
    hd = h.to(torch.float64)
    a = torch.zeros_like(hd)
    b = torch.zeros(hd.shape[0], dtype=torch.float64, device=hd.device)
    for w, q in pairs:
        qt = torch.from_numpy(q).to(hd.device, torch.float64)
        a += hd * gram(qt)
        b += (qt * (torch.from_numpy(w).to(hd.device, torch.float64) @ hd)).sum(0)
    lam = ridge * float(torch.diag(a).mean())
    with one_thread():  # MKL's LU differs between thread counts
        u = torch.linalg.solve(a + lam * torch.eye(len(b), dtype=torch.float64, device=hd.device), b + lam)
    return u.to(torch.float32).cpu().numpy()


def clip_search(
    w: np.ndarray,
    type_name: str,
    importance: np.ndarray,
    h: torch.Tensor,
    grid: int = 20,
    min_ratio: float = 0.5,
    unit: int = 32,
) -> np.ndarray:
    """AWQ's clipping search: per row and ``unit`` columns, the clip of |w| (a fraction of the
    unit's max, from 1 down to ``min_ratio``) whose quantization has the least output error, with
    the unit's diagonal block of ``h`` (cross-unit correlation ignored, as in AWQ). Returns the
    clipped weights, or ``w`` itself when clipping does not lower the error of the whole row set."""
    rows, cols = w.shape
    nb = cols // unit
    hb = torch.stack([h[b * unit : (b + 1) * unit, b * unit : (b + 1) * unit] for b in range(nb)])
    wt = torch.from_numpy(w).to(h.device).view(rows, nb, unit)
    top = wt.abs().amax(-1, keepdim=True)  # (rows, nb, 1)
    best_err: torch.Tensor | None = None
    best = wt.clone()
    for k in range(grid + 1):
        ratio = 1.0 - (1.0 - min_ratio) * k / grid
        wc = torch.maximum(torch.minimum(wt, top * ratio), -top * ratio)
        q = torch.from_numpy(quantized_weights(wc.reshape(rows, cols).cpu().numpy(), type_name, importance))
        e = wt - q.to(h.device).view(rows, nb, unit)
        # (rows, nb) e_b H_b e_b^T, contracted pairwise left to right as einsum does with three
        # operands (the same sums, bit for bit), several times faster than the three-operand call
        err = torch.einsum("rbj,rbj->rb", torch.einsum("rbi,bij->rbj", e, hb), e)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best[better] = wc[better]
    clipped = best.reshape(rows, cols).cpu().numpy()

    def loss(v: np.ndarray) -> float:
        e = torch.from_numpy(w - quantized_weights(v, type_name, importance)).to(h.device)
        return total(mm(e, h) * e)

    return clipped if loss(clipped) < loss(w) else w
