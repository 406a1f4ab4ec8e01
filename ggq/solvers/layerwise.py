"""Layer-by-layer calibration: each decoder layer is solved on the outputs of the already
quantized layers before it, with one layer's weights and the calibration activations in memory.

Within a layer the linears are solved in the order the data flows (true-sequential):
q/k/v on the attention input, o on the attention output computed with the quantized q/k/v,
gate/up on the MLP input, down on the MLP activations computed with the quantized gate/up.
The layer's output with all its quantized weights is the next layer's input.

Methods: ``gptq`` (GPTQ of the checkpoint's weights), ``awq`` (AWQ scales searched and folded,
then importance-weighted RTN, i.e. llama.cpp's imatrix encoders with the scaled activations'
mean squares) and ``awq+gptq`` (AWQ scales, then GPTQ on the scaled input). A group's scales are
searched when its input is computed with everything before it already quantized, and before any
of the group's linears or the tensor it folds into is quantized.

Memory: only the residual stream (nsamples, seqlen, n_embd) is kept for all calibration windows.
Every linear's input is recomputed from it ``SolverOptions.batch`` windows at a time and reduced
batch by batch into its statistics (X^T X, the per-column sums, AWQ's sample X^T X), so the
12288-wide MLP activations of Qwen3-8B are never all in memory, whatever nsamples x seqlen. The
sums are taken in fixed chunks of rows in order (MEAN_ROWS for the per-column sums, GRAM_ROWS for
X^T X), so they are the same bits as over all tokens at once, whatever the batch size.

Device: the forward passes, the input statistics and AWQ's search products run on
``SolverOptions.device`` (torch); the ggml encoders and the GPTQ column loop run on the CPU in
numpy. The layer's weights live on the CPU (what the encoders read) with one device copy,
refreshed only when a weight changes (fold, quantize, refit). On the CPU both are the same
tensors and the results are those of the plain CPU code, bit for bit.

Threads: the long sums (X^T X, AWQ's losses and refit) are taken in a fixed order and the
factorizations (GPTQ's inverse Cholesky, the refit's solve) on one thread (reductions.py), so
the bytes on the CPU do not depend on torch's, MKL's or the encoders' thread counts.

Each linear's input energy (sum of x^2 per input column and the token count, llama.cpp's imatrix
entry) is taken from the input it reads in the written model: with AWQ the folded model's, with
the quantized tensors before it, and the refit norms applied.
"""

from __future__ import annotations

import functools
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from ggq import ggml, qwen3
from ggq.checkpoint import Checkpoint, HParams
from ggq.solvers import awq, head, moe
from ggq.solvers.gptq import Factor, Target, gptq
from ggq.solvers.options import (
    HEAD,
    LayerReport,
    SolverError,
    SolverOptions,
    check_targets,
    clock,
    fit_memory,
    head_tensor,
    solver_devices,
    timed,
)
from ggq.solvers.reductions import GRAM_ROWS, fixed_order, gram, mirror_upper, mm, total

# Rows per partial sum of the per-column sums (mean |x|, mean x^2). torch's ``mean(0)`` on the
# CPU adds the rows in a cascade whose third level is 4096-row partials added in order (up to
# 2^19 rows), so 4096-row chunks summed in order give its bits (test_solver_memory checks it).
MEAN_ROWS = 4096
REFIT_INPUTS = ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")  # linears behind a refit norm


def hessian(x: torch.Tensor) -> np.ndarray:
    """sum over tokens of x x^T, in float64: (n_in, n_in), the same bits at any thread count."""
    return gram(x).cpu().numpy()


def _take(pending: list[torch.Tensor], k: int) -> torch.Tensor:
    """The first ``k`` rows of the pieces in ``pending`` (removed from it), as one tensor."""
    parts, got = [], 0
    while got < k:
        t = pending[0]
        if t.shape[0] <= k - got:
            parts.append(pending.pop(0))
        else:
            parts.append(t[: k - got])
            pending[0] = t[k - got :].clone()  # not a view: the rest of the batch can go
        got += parts[-1].shape[0]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _GramStream:
    """gram() of rows given in pieces: they are taken GRAM_ROWS at a time in order, so the sum is
    gram() of all the rows at once, bit for bit, whatever the pieces. ``upper``: the upper
    triangle summed and mirrored at the end (gram(upper=True), then mirror_upper)."""

    def __init__(self, dtype: torch.dtype, upper: bool = False) -> None:
        self.dtype, self.upper = dtype, upper
        self.acc: torch.Tensor | None = None  # (n, n) float64
        self.pending: list[torch.Tensor] = []
        self.rows = 0

    def add(self, rows: torch.Tensor) -> None:  # (k, n)
        if rows.shape[0]:
            self.pending.append(rows)
            self.rows += rows.shape[0]
        if self.rows >= GRAM_ROWS:
            self._flush(self.rows - self.rows % GRAM_ROWS)

    def _flush(self, k: int) -> None:
        self.rows -= k
        rows = _take(self.pending, k)
        if self.acc is None:  # gram() adds to zeros too; given them, it adds in place from the start
            n = rows.shape[-1]
            self.acc = torch.zeros(n, n, dtype=torch.float64, device=rows.device)
        self.acc = gram(rows, self.dtype, into=self.acc, upper=self.upper)

    def result(self) -> torch.Tensor:
        if self.rows:
            self._flush(self.rows)
        assert self.acc is not None
        return mirror_upper(self.acc) if self.upper else self.acc


@dataclass
class InputStats:
    """What the solvers need of one input X (tokens, n_in)."""

    mean_abs: np.ndarray  # (n_in,) AWQ's salience
    mean_sq: np.ndarray  # (n_in,) importance, as llama.cpp's imatrix stores it
    sum_sq: np.ndarray  # (n_in,) float64 sum of x^2 over all tokens (an imatrix entry), from mean_sq
    tokens: int
    # (n_in, n_in) float32 sum of x x^T over evenly strided tokens, on x's device (None: not asked)
    h_sample: torch.Tensor | None
    # (n_in, n_in) float64 over all tokens, for GPTQ: float32 products of GRAM_ROWS-row chunks
    # added in float64 (the upper triangle, mirrored), or with ``legacy`` float64 products
    h_full: np.ndarray | None
    x_sample: torch.Tensor | None = None  # (k, n_in) evenly strided tokens, for the error diagnostics
    # GPTQ's factorization of h_full (gptq.Factor), made by the first linear solved on it and
    # reused by the others reading the same input (q/k/v, gate/up)
    factor: Factor | None = None

    @classmethod
    def of(
        cls, x: torch.Tensor, search_tokens: int, full: bool, sample: bool = True, legacy: bool = False
    ) -> InputStats:
        s = StatsStream(x.shape[:-1].numel(), search_tokens, full, sample, legacy=legacy)
        s.add(x)
        return s.result()

    @property
    def h(self) -> np.ndarray:
        if self.h_full is not None:
            return self.h_full
        assert self.h_sample is not None
        return self.h_sample.to(torch.float64).cpu().numpy()


class StatsStream:
    """InputStats of an input given batch by batch (``tokens`` rows in all): the same values, bit
    for bit, as InputStats.of on all the rows at once, with at most a few chunks of rows held.
    ``legacy``: h_full from float64 products of the whole matrix (SolverOptions.legacy_gptq)."""

    def __init__(
        self,
        tokens: int,
        search_tokens: int,
        full: bool,
        sample: bool = True,
        diag_tokens: int = 0,
        legacy: bool = False,
    ) -> None:
        self.tokens = tokens
        self.stride = max(1, tokens // search_tokens)  # of the tokens in h_sample
        self.diag_stride = max(1, tokens // diag_tokens) if diag_tokens else 0
        self.pending: list[torch.Tensor] = []
        self.n_pending = self.seen = 0
        self.sum_abs: torch.Tensor | None = None  # (n,) float32, chunk sums added in order
        self.sum_sq: torch.Tensor | None = None
        self.full = None
        if full:
            self.full = _GramStream(torch.float64) if legacy else _GramStream(torch.float32, upper=True)
        self.sample = _GramStream(torch.float32) if sample else None
        self.diag: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1])  # (rows, n)
        self.pending.append(flat)
        self.n_pending += flat.shape[0]
        while self.n_pending >= MEAN_ROWS:
            self._chunk(MEAN_ROWS)

    def _chunk(self, k: int) -> None:
        c = _take(self.pending, k)  # (k, n): rows seen .. seen + k of the input
        self.n_pending -= k
        s_abs, s_sq = c.abs().sum(0), c.pow(2).sum(0)
        self.sum_abs = s_abs if self.sum_abs is None else self.sum_abs + s_abs
        self.sum_sq = s_sq if self.sum_sq is None else self.sum_sq + s_sq
        if self.full is not None:
            self.full.add(c)
        if self.sample is not None:
            self.sample.add(c[(-self.seen) % self.stride :: self.stride])
        if self.diag_stride:
            self.diag.append(c[(-self.seen) % self.diag_stride :: self.diag_stride].clone())
        self.seen += k

    def result(self) -> InputStats:
        if self.n_pending:
            self._chunk(self.n_pending)
        if self.seen != self.tokens or self.sum_abs is None or self.sum_sq is None:
            raise SolverError(f"calibration input: {self.seen} rows where {self.tokens} were expected")
        mean_sq = (self.sum_sq / self.seen).cpu().numpy()
        return InputStats(
            mean_abs=(self.sum_abs / self.seen).cpu().numpy().astype(np.float64),
            mean_sq=mean_sq,
            sum_sq=mean_sq.astype(np.float64) * self.seen,  # float32 precision, as llama-imatrix sums
            tokens=self.seen,
            h_sample=self.sample.result().to(torch.float32) if self.sample is not None else None,
            h_full=self.full.result().cpu().numpy() if self.full is not None else None,
            x_sample=torch.cat(self.diag) if self.diag else None,
        )


def _diagnose(
    w: np.ndarray, q: np.ndarray, type_name: str, cols: np.ndarray | None, xs: torch.Tensor, max_rows: int
) -> tuple[float, float]:
    """LayerReport.errors of a linear: the relative output errors on the token sample ``xs`` of
    plain RTN (of the weights before AWQ's column factors ``cols``) and of the solver's ``q``,
    both on every ``rows // max_rows``-th row (all of them below 2 x ``max_rows`` rows or with
    ``max_rows`` 0). ggml encodes each row on its own, so the sampled rows' RTN is exactly the
    whole matrix's RTN of those rows."""
    ws, qs = awq.sample_rows(w, max_rows), awq.sample_rows(q, max_rows)
    if cols is None:
        rtn = awq.quantized_weights(ws, type_name, None)
    else:
        rtn = awq.quantized_weights(ws / cols[None, :], type_name, None) * cols[None, :]
    errs = _rel_errors(ws, [rtn, qs], xs)
    return errs[0], errs[1]


def _rel_errors(w: np.ndarray, qs: list[np.ndarray], xs: torch.Tensor) -> list[float]:
    """Per q in ``qs``, ||Xs (W - Q)^T|| / ||Xs W^T|| on the token sample ``xs`` (k, n_in)."""
    wt = torch.from_numpy(w).to(xs.device)
    ref = mm(xs, wt.T)  # (k, rows)
    den = total(ref * ref)
    out = []
    for q in qs:
        e = mm(xs, (wt - torch.from_numpy(q).to(xs.device)).T)
        out.append(math.sqrt(total(e * e) / den) if den > 0 else 0.0)
    return out


class Residual:
    """The residual stream of every calibration window, (B, T, n_embd) float32: a tensor on the
    device, or (``spill``) an unlinked temporary file read and written a few windows at a time,
    so that the page cache holds it instead of this process (and a killed run leaves no file)."""

    def __init__(self, shape: tuple[int, int, int], device: str, spill: bool) -> None:
        self.shape, self.device = shape, device
        self.window_bytes = shape[1] * shape[2] * 4
        self.mem: torch.Tensor | None = None
        self.file = None
        if not spill:
            self.mem = torch.empty(shape, dtype=torch.float32, device=device)
            return
        need, where = shape[0] * self.window_bytes, tempfile.gettempdir()
        free = shutil.disk_usage(where).free
        if free < need:
            raise SolverError(
                f"calibration activations: {need / 2**30:.2f} GiB to keep in {where}, "
                f"{free / 2**30:.2f} GiB free there (lower --nsamples/--seqlen or free disk)"
            )
        self.file = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close(), unlinked already)

    @classmethod
    def of(cls, h: torch.Tensor) -> Residual:
        r = cls((h.shape[0], h.shape[1], h.shape[2]), str(h.device), spill=False)
        r.mem = h  # in place: h is updated
        return r

    def read(self, i: int, j: int) -> torch.Tensor:
        """Windows i..j (j - i, T, n_embd) on the device (in memory: a view)."""
        if self.mem is not None:
            return self.mem[i:j]
        assert self.file is not None
        out = np.empty((j - i, *self.shape[1:]), np.float32)
        self.file.seek(i * self.window_bytes)
        self.file.readinto(out.data.cast("B"))
        return torch.from_numpy(out).to(self.device)

    def write(self, i: int, value: torch.Tensor) -> None:
        if self.mem is not None:
            if value.data_ptr() != self.mem[i].data_ptr():
                self.mem[i : i + value.shape[0]] = value
            return
        assert self.file is not None
        self.file.seek(i * self.window_bytes)
        self.file.write(np.ascontiguousarray(value.cpu().numpy()).data.cast("B"))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


@dataclass
class _Layer:
    """One layer being solved: its weights (replaced by the folded / quantized ones as it goes) on
    the CPU and their copy on the device, their types, and the bytes to write."""

    w: dict[str, torch.Tensor]  # on the CPU: what the encoders read
    types: dict[str, str]  # short name -> ggml type
    hp: HParams
    opts: SolverOptions
    rep: LayerReport
    out: dict[str, np.ndarray] = field(default_factory=dict)  # short name -> tensor bytes
    col_scale: dict[str, np.ndarray] = field(default_factory=dict)  # linear -> AWQ factor of its columns
    unquantized: dict[str, np.ndarray] = field(default_factory=dict)  # linear -> (folded) weights, for refit
    dev: dict[str, torch.Tensor] = field(default_factory=dict)  # the weights on opts.device
    # linear -> (sum of x^2 per input column, tokens) of the input it reads in the written model;
    # a merged expert tensor: ((n_expert, n_in), (n_expert,)), llama-imatrix's per-expert entry
    act_sums: dict[str, tuple[np.ndarray, int | np.ndarray]] = field(default_factory=dict)
    # Qwen3-MoE: merged expert tensor -> each expert's bytes so far, and (rtn, solver) errors
    expert_out: dict[str, list[np.ndarray]] = field(default_factory=dict)
    expert_errors: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.refresh(*self.w)

    @property
    def refits(self) -> bool:
        return self.opts.kind.scales_activations and self.opts.refit_norms

    def refresh(self, *names: str) -> None:
        """Copy changed weights to the device (on the CPU the copy is the tensor itself)."""
        for n in names:
            self.dev[n] = self.w[n].to(self.opts.device)

    def set(self, name: str, value: torch.Tensor) -> None:
        self.w[name] = value
        self.refresh(name)

    def stats(self, batches: Iterable[torch.Tensor], tokens: int, refit: bool = False) -> InputStats:
        """The statistics of an input given batch by batch: X^T X in float64 for GPTQ, the
        strided sample's X^T X for AWQ's clip search (and for a norm refit, when ``refit``)."""
        kind = self.opts.kind
        sample = not kind.uses_gptq or (refit and self.refits)
        diag = self.opts.diag_tokens
        legacy = self.opts.legacy_gptq
        s = StatsStream(tokens, self.opts.search_tokens, kind.uses_gptq, sample, diag, legacy)
        for b in batches:
            with timed("stats"):
                s.add(b)
        with timed("stats"):
            return s.result()

    def scale(
        self,
        prev: str,
        batches: Callable[[], Iterable[torch.Tensor]],
        tokens: int,
        block: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor] | None = None,
    ) -> bool:
        """AWQ: search the scales of the group fed by ``prev`` on its linears' input (``batches()``)
        and fold them in; False (nothing done) for gptq or a group without quantized linears.
        ``block(x, weights)``: the output of the block the group's linears are part of, on input
        windows x (k, T, n_in), for SolverOptions.block_candidates."""
        group = next(g for g in awq.QWEN3_GROUPS if g.prev == prev)
        quantized = [n for n in group.linears if self.types[n] not in ggml.FLOAT_TYPES]
        if not self.opts.kind.scales_activations or not quantized:
            return False
        s = StatsStream(tokens, self.opts.search_tokens, full=False)
        use_block = block is not None and self.opts.block_candidates > 1
        windows: list[torch.Tensor] = []  # (T, n_in) evenly strided windows of the input, for block
        seen = 0
        for b in batches():
            with timed("stats"):
                s.add(b)
                if use_block:
                    windows += self._sample_windows(b, seen, tokens // b.shape[1])
                seen += b.shape[0]
        with timed("stats"):
            stats = s.result()
        assert stats.h_sample is not None
        with timed("solve"):
            xs = torch.stack(windows) if windows else None
            self._search(group, quantized, stats.h_sample.shape[0], stats, block if use_block else None, xs)
        return True

    def _sample_windows(self, b: torch.Tensor, seen: int, n_win: int) -> list[torch.Tensor]:
        """The windows of batch ``b`` (its first is window ``seen`` of ``n_win``) that are in the
        block objective's sample: every stride-th, block_tokens tokens in all."""
        stride = max(1, n_win // max(1, self.opts.block_tokens // b.shape[1]))
        return [b[i].clone() for i in range((-seen) % stride, b.shape[0], stride)]

    def _search(
        self,
        group: awq.ScaleGroup,
        quantized: list[str],
        n_in: int,
        stats: InputStats,
        block: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor] | None = None,
        xs: torch.Tensor | None = None,
    ) -> None:
        hp, prev = self.hp, group.prev
        assert stats.h_sample is not None
        channel = awq.channel_map(group, n_in, hp.n_head, hp.n_head_kv, hp.head_dim)
        weights = [(self.w[n].numpy(), self.types[n]) for n in quantized]
        salience = (
            stats.mean_abs if self.opts.salience == "mean_abs" else np.sqrt(stats.mean_sq.astype(np.float64))
        )
        ranked = awq.ranked_scales(
            weights,
            stats.h_sample,
            salience,
            stats.mean_sq,
            channel,
            self.opts.awq_grid,
            self.opts.search_rows,
        )
        found = ranked[0]
        if block is not None and xs is not None:
            ref = block(xs, self.dev)  # the block's output with the float weights

            def block_error(qs: list[torch.Tensor]) -> float:
                w = dict(self.dev) | {n: q.to(xs.device) for n, q in zip(quantized, qs, strict=True)}
                return total((block(xs, w) - ref) ** 2)

            found = awq.block_choice(
                ranked[: self.opts.block_candidates], weights, stats.mean_sq, channel, block_error
            )
        if self.opts.clip_candidates > 1 and self.opts.clip:
            found = awq.clipped_choice(
                ranked[: self.opts.clip_candidates],
                weights,
                stats.h_sample,
                stats.mean_sq,
                channel,
                self.opts.clip_candidate_grid,
            )
        if self.opts.refine_scales:
            found = awq.refine_scales(weights, stats.h_sample, stats.mean_sq, channel, found)
        self.rep.alphas[prev] = found.exponents
        awq.fold(self.w, group, torch.from_numpy(found.scales), channel)
        self.refresh(group.prev, *group.linears)
        for n in group.linears:
            self.col_scale[n] = found.scales[channel]

    def quantize(self, names: tuple[str, ...], stats: InputStats, last_use: bool = False) -> None:
        """Encode linears reading the input of ``stats``; their weights become the decoded ones.
        ``last_use``: nothing reads ``stats`` after, so GPTQ may factorize its X^T X in place."""
        for name in names:
            t, wn = self.types[name], self.w[name].numpy()
            if t in ggml.FLOAT_TYPES:
                with timed("encode"):
                    data = ggml.quantize(wn, t)
                    q = ggml.dequantize(data, t, wn.shape[1])
            elif self.opts.kind.uses_gptq:
                # one factorization of X^T X for every linear reading it (q/k/v, gate/up), made
                # by the first; H is not read after it, so with last_use it is factorized in place
                legacy, factor = self.opts.legacy_gptq, stats.factor
                overwrite = last_use and (name == names[-1] if legacy else factor is None)
                with timed("solve"):
                    res = gptq(
                        wn,
                        stats.h_full if factor is None else None,
                        Target(t),
                        damp=self.opts.damp,
                        act_order=self.opts.act_order,
                        overwrite=overwrite,
                        legacy=legacy,
                        factor=factor,
                    )
                data, q = res.data, res.weights
                self.rep.damp[name] = res.damp
                # the factor (H's memory) is not held through the last linear's diagnostics
                stats.factor = res.factor if not (last_use and name == names[-1]) else None
                del res
                if overwrite:  # factorized in place: garbage now
                    stats.h_full = None
            else:
                assert stats.h_sample is not None
                with timed("solve"):
                    wc = awq.clip_search(wn, t, stats.mean_sq, stats.h_sample) if self.opts.clip else wn
                with timed("encode"):
                    data = ggml.quantize(wc, t, stats.mean_sq, n_threads=0)
                    q = ggml.dequantize(data, t, wn.shape[1])
            if t not in ggml.FLOAT_TYPES and stats.x_sample is not None:
                with timed("diag"):
                    s = self.col_scale.get(name)  # plain RTN of the unscaled weights
                    self.rep.errors[name] = _diagnose(wn, q, t, s, stats.x_sample, self.opts.diag_rows)
            self.out[name] = data
            if self.refits and name in REFIT_INPUTS:
                self.unquantized[name] = wn
            self.act_sums[name] = (stats.sum_sq, stats.tokens)
            self.set(name, torch.from_numpy(q))

    def quantize_expert(
        self, name: str, e: int, stats: InputStats, last_use: bool = False, cols: np.ndarray | None = None
    ) -> None:
        """Expert ``e`` of the merged ``name`` on its input's statistics: GPTQ on X^T X (gptq,
        awq+gptq) or the clip search and importance-weighted RTN (awq). Its bytes go to
        ``expert_out``, its slice of the layer's weights (and their device copy) becomes the decoded
        one. ``cols``: the AWQ factor of its columns (the diagnostics' RTN is of the unscaled weights)."""
        t, we = self.types[name], self.w[name][e].numpy()  # (rows, cols), a view of the 3-D tensor
        if t in ggml.FLOAT_TYPES:
            with timed("encode"):
                data = ggml.quantize(we, t)
                q = ggml.dequantize(data, t, we.shape[1])
        elif self.opts.kind.uses_gptq:
            assert stats.h_full is not None
            with timed("solve"):
                res = gptq(
                    we,
                    stats.h_full,
                    Target(t),
                    damp=self.opts.damp,
                    act_order=self.opts.act_order,
                    overwrite=last_use,
                    legacy=self.opts.legacy_gptq,
                )
            data, q = res.data, res.weights
            self.rep.damp[name] = max(self.rep.damp.get(name, 0.0), res.damp)
            if last_use:
                stats.h_full = None
        else:
            assert stats.h_sample is not None
            with timed("solve"):
                wc = awq.clip_search(we, t, stats.mean_sq, stats.h_sample) if self.opts.clip else we
            with timed("encode"):
                data = ggml.quantize(wc, t, stats.mean_sq, n_threads=0)
                q = ggml.dequantize(data, t, we.shape[1])
        if t not in ggml.FLOAT_TYPES and stats.x_sample is not None:
            with timed("diag"):
                errs = _diagnose(we, q, t, cols, stats.x_sample, self.opts.diag_rows)
                self.expert_errors.setdefault(name, []).append(errs)
        self.expert_out.setdefault(name, []).append(data)
        self.w[name][e] = torch.from_numpy(q)
        if self.dev[name] is not self.w[name]:
            self.dev[name][e] = self.w[name][e].to(self.dev[name].device)

    def finish_experts(self) -> None:
        """The merged tensors' bytes, expert 0 first (each expert's rows whole: ggml's 3-D layout);
        the report's error of a merged tensor is the mean over its experts."""
        for name, parts in self.expert_out.items():
            self.out[name] = np.concatenate(parts)
        for name, errs in self.expert_errors.items():
            self.rep.errors[name] = (
                float(np.mean([a for a, _ in errs])),
                float(np.mean([b for _, b in errs])),
            )

    def refit(self, norm: str, names: tuple[str, ...], stats: InputStats) -> bool:
        """AWQ: the norm feeding the quantized ``names`` refit by least squares (awq.refit_norm)."""
        if not self.refits:
            return False
        assert stats.h_sample is not None
        pairs = [(self.unquantized.pop(n), self.w[n].numpy()) for n in names]
        with timed("solve"):
            u = awq.refit_norm(pairs, stats.h_sample)  # (n_in,) float32
        self.set(norm, self.w[norm] * torch.from_numpy(u))
        for n in names:  # the linears now read x * u
            sums, tokens = self.act_sums[n]
            self.act_sums[n] = (sums * u.astype(np.float64) ** 2, tokens)
        return True

    def finish_norms(self) -> None:
        with timed("encode"):
            for name in ("attn_norm", "ffn_norm"):
                self.out[name] = ggml.quantize(self.w[name].numpy()[None, :], self.types[name])


@dataclass(frozen=True)
class LayerResult:
    tensors: dict[str, np.ndarray]  # short name -> bytes of every tensor the solver changed
    # linear -> (sum of x^2 per input column, tokens) of its calibration input in the written model
    # (merged experts: per expert, llama-imatrix's layout)
    act_sums: dict[str, tuple[np.ndarray, int | np.ndarray]]


@fixed_order()
def solve_layer(
    h: torch.Tensor | Residual,
    w: dict[str, torch.Tensor],
    hp: HParams,
    rope: qwen3.Rope,
    types: dict[str, str],
    opts: SolverOptions,
    rep: LayerReport,
) -> tuple[torch.Tensor | Residual, LayerResult]:
    """One layer, true-sequential, ``h`` (B, T, n_embd) on ``opts.device`` and ``w`` on the CPU:
    returns the quantized layer's output (``h`` itself, updated in place) and its result.
    Under fixed_order(): on the CPU every bit is one thread's, whatever the thread count."""
    L = _Layer(w, {n: types[f"blk.{rep.layer}.{n}.weight"] for n in w}, hp, opts, rep)
    d = L.dev  # the forward reads the device copy, kept current by L
    R = h if isinstance(h, Residual) else Residual.of(h)
    n_win = R.shape[0]
    tokens = n_win * R.shape[1]
    finite = [True]

    def batches(fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[torch.Tensor]:
        """``fn`` of the residual stream, ``opts.batch`` windows at a time, with the current weights."""
        for i in range(0, n_win, opts.batch):
            with timed("forward"):
                y = fn(R.read(i, min(i + opts.batch, n_win)))
            yield y

    def residual(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """h += fn(h), batch by batch (each batch's input is read before it is overwritten)."""
        for i in range(0, n_win, opts.batch):
            with timed("forward"):
                b = R.read(i, min(i + opts.batch, n_win))
                b += fn(b)
                finite[0] &= bool(torch.isfinite(b).all())
                R.write(i, b)

    def attn_in(b: torch.Tensor) -> torch.Tensor:
        return qwen3.attention_input(b, d, hp)

    def o_in(b: torch.Tensor) -> torch.Tensor:
        return qwen3.attention_core(attn_in(b), d, hp, rope)

    def mlp_in(b: torch.Tensor) -> torch.Tensor:
        return qwen3.mlp_input(b, d, hp)

    def down_in(b: torch.Tensor) -> torch.Tensor:
        return qwen3.mlp_core(mlp_in(b), d)

    def attn_block(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        return mm(qwen3.attention_core(x, w, hp, rope), w["attn_output"].T)

    def mlp_block(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        return mm(qwen3.mlp_core(x, w), w["ffn_down"].T)

    L.scale("attn_norm", lambda: batches(attn_in), tokens, attn_block)
    st = L.stats(batches(attn_in), tokens, refit=True)  # with the folded norm, as llama.cpp computes it
    L.quantize(("attn_q", "attn_k"), st)
    L.scale("attn_v", lambda: batches(o_in), tokens)  # v is unquantized until folded into
    L.quantize(("attn_v",), st)
    L.refit("attn_norm", ("attn_q", "attn_k", "attn_v"), st)
    L.quantize(("attn_output",), L.stats(batches(o_in), tokens), last_use=True)
    residual(lambda b: mm(o_in(b), d["attn_output"].T))
    if qwen3.ROUTER in w:  # Qwen3-MoE: the experts, each on the tokens the router sends it
        solve_experts(L, lambda: batches(mlp_in), tokens)
        residual(lambda b: qwen3.moe_core(mlp_in(b), d, hp))
        if not finite[0]:
            raise SolverError(f"layer {rep.layer}: NaN/Inf in the calibration activations")
        return h, LayerResult(L.out, L.act_sums)
    L.scale("ffn_norm", lambda: batches(mlp_in), tokens, mlp_block)
    st = L.stats(batches(mlp_in), tokens, refit=True)
    L.quantize(("ffn_gate",), st)
    L.scale("ffn_up", lambda: batches(down_in), tokens)
    L.quantize(("ffn_up",), st)
    L.refit("ffn_norm", ("ffn_gate", "ffn_up"), st)
    del st
    L.quantize(("ffn_down",), L.stats(batches(down_in), tokens), last_use=True)
    residual(lambda b: mm(down_in(b), d["ffn_down"].T))  # the quantized layer's output feeds the next layer
    if not finite[0]:
        raise SolverError(f"layer {rep.layer}: NaN/Inf in the calibration activations")
    if opts.kind.scales_activations:
        L.finish_norms()
    return h, LayerResult(L.out, L.act_sums)


EXPERT_WEIGHTINGS = ("plain", "weighted")
GATE_EXPS, UP_EXPS, DOWN_EXPS = qwen3.EXPERTS


def solve_experts(L: _Layer, inputs: Callable[[], Iterable[torch.Tensor]], tokens: int) -> None:
    """Every expert of a Qwen3-MoE layer, one expert at a time (its statistics only in memory).

    ``inputs()`` yields the MLP input (the normed residual, with the layer's attention already
    quantized) batch by batch. The router (float32) routes each token once; expert e's gate/up are
    solved on the statistics of the tokens routed to it, its down on the SwiGLU of those tokens
    through its quantized gate/up. ``expert_weighting`` "weighted" scales each token's row by its
    routing weight (X^T X then weights it by the square: the factor of its output error).

    gptq: GPTQ on X^T X. awq / awq+gptq (solvers/moe.py): first the ffn_norm scale shared by all
    experts, searched on the sum of their gate/up output errors and folded into the norm, every
    expert's gate/up and the router's columns (the router stays exact); then per expert gate,
    its up -> down scale (searched on its SwiGLU through the quantized gate), up, down; each
    quantized as the dense path does (importance-weighted RTN after the clip search, or GPTQ).

    Fallback: an expert routed fewer than ``expert_min_tokens`` tokens (default n_embd: below it
    its X^T X cannot have full rank and GPTQ would fit the damping) is solved as if every token of
    the layer were routed to it with weight 1, i.e. on the pooled statistics of all calibration
    tokens (and its own SwiGLU of them for down), without an up -> down scale. Never left
    unquantized; the report lists the tokens per expert and the experts that fell back."""
    hp, opts, rep, d = L.hp, L.opts, L.rep, L.dev
    where = f"layer {rep.layer}"
    if opts.expert_weighting not in EXPERT_WEIGHTINGS:
        raise SolverError(
            f"expert weighting {opts.expert_weighting!r}: expected one of {', '.join(EXPERT_WEIGHTINGS)}"
        )
    with timed("forward"):
        routings = [qwen3.route(x, d, hp) for x in inputs()]
    unrouted = sum(int((~torch.isfinite(r.weights).all(-1)).sum()) for r in routings)
    if unrouted:
        raise SolverError(
            f"{where}: blk.{rep.layer}.{qwen3.ROUTER}.weight routes {unrouted} of {tokens} calibration tokens "
            "to no expert (NaN/Inf routing weights)"
        )
    counts = sum((r.counts(hp.n_expert) for r in routings), np.zeros(hp.n_expert, np.int64))
    min_tokens = opts.expert_min_tokens or hp.n_embd
    rep.expert_tokens = [int(c) for c in counts]
    weighted = opts.expert_weighting == "weighted"
    kind = opts.kind
    pooled = [bool(counts[e] < min_tokens) for e in range(hp.n_expert)]
    rep.expert_fallbacks = [e for e in range(hp.n_expert) if pooled[e]]

    sums: dict[str, list[np.ndarray]] = {n: [] for n in qwen3.EXPERTS}  # per expert, for act_sums

    def stream(
        e: int, fn: Callable[[torch.Tensor], torch.Tensor], full: bool, sample: bool, record: str = ""
    ) -> InputStats:
        """Statistics of ``fn`` of expert e's input rows (all rows when it fell back), weighted
        by their routing weights with "weighted"; ``record``: the merged tensor reading them, whose
        imatrix entry gets expert e's sum of squares over its routed rows (as llama-imatrix sums:
        unweighted, only the rows routed to it)."""
        n = tokens if pooled[e] else int(counts[e])
        s = StatsStream(n, opts.search_tokens, full, sample, opts.diag_tokens, opts.legacy_gptq)
        routed: torch.Tensor | None = None  # sum of y^2 over e's routed rows, unweighted (imatrix)
        for x, r in zip(inputs(), routings, strict=True):
            flat = x.reshape(-1, x.shape[-1])
            idx, wr = r.tokens_of(e)
            xe, weight = (flat, None) if pooled[e] else (flat[idx], wr if weighted else None)
            with timed("forward"):
                y = fn(xe)
                if record:
                    own = y[idx] if pooled[e] else y
                    sq = own.to(torch.float64).pow(2).sum(0)
                    routed = sq if routed is None else routed + sq
                if weight is not None:
                    y = y * weight[:, None]
            with timed("stats"):
                s.add(y)
        with timed("stats"):
            st = s.result()
        if record:
            assert routed is not None
            sums[record].append(routed.cpu().numpy())
        return st

    def identity(x: torch.Tensor) -> torch.Tensor:
        return x

    full, sample = kind.uses_gptq, not kind.uses_gptq
    norm_cols = _scale_experts_norm(L, inputs, tokens, counts, stream) if kind.scales_activations else None
    for e in range(hp.n_expert):
        st = stream(e, identity, full, sample, record=GATE_EXPS)
        sums[UP_EXPS].append(sums[GATE_EXPS][-1])  # gate and up read the same input
        L.quantize_expert(GATE_EXPS, e, st, cols=norm_cols)
        up_cols = None
        if kind.scales_activations and not pooled[e] and L.types[DOWN_EXPS] not in ggml.FLOAT_TYPES:
            act = stream(e, functools.partial(qwen3.expert_core, w=d, e=e), full=False, sample=True)
            assert act.h_sample is not None
            with timed("solve"):
                found = awq.search_scales(
                    [(L.w[DOWN_EXPS][e].numpy(), L.types[DOWN_EXPS])],
                    act.h_sample,
                    act.mean_abs,
                    act.mean_sq,
                    np.arange(act.h_sample.shape[0]),
                    opts.awq_grid,
                )
            del act
            moe.fold_up(L.w, e, torch.from_numpy(found.scales))
            L.refresh(UP_EXPS, DOWN_EXPS)
            up_cols = found.scales
        L.quantize_expert(UP_EXPS, e, st, last_use=True, cols=norm_cols)
        del st
        swiglu = functools.partial(qwen3.expert_core, w=d, e=e)  # through the quantized gate/up
        L.quantize_expert(
            DOWN_EXPS, e, stream(e, swiglu, full, sample, DOWN_EXPS), last_use=True, cols=up_cols
        )
    L.finish_experts()
    for n, per_expert in sums.items():  # (n_expert, n_in) and (n_expert,) tokens: llama-imatrix's entry
        L.act_sums[n] = (np.stack(per_expert), counts.copy())
    router_in = torch.zeros(hp.n_embd, dtype=torch.float64)  # llama-imatrix has the router's entry too
    for x in inputs():  # with the folded norm, as the written model computes it
        with timed("stats"):
            router_in += x.reshape(-1, x.shape[-1]).to(torch.float64).pow(2).sum(0).cpu()
    L.act_sums[qwen3.ROUTER] = (router_in.numpy(), tokens)
    if kind.scales_activations:
        L.finish_norms()
        with timed("encode"):
            L.out[qwen3.ROUTER] = ggml.quantize(L.w[qwen3.ROUTER].numpy(), L.types[qwen3.ROUTER])


def _scale_experts_norm(
    L: _Layer,
    inputs: Callable[[], Iterable[torch.Tensor]],
    tokens: int,
    counts: np.ndarray,
    stream: Callable[[int, Callable[[torch.Tensor], torch.Tensor], bool, bool], InputStats],
) -> np.ndarray | None:
    """AWQ's ffn_norm scale of a MoE layer (solvers/moe.py), folded into L's weights: returns the
    factor of the experts' gate/up columns, or None (gate/up kept in a float type: no search)."""
    hp, opts = L.hp, L.opts
    if L.types[GATE_EXPS] in ggml.FLOAT_TYPES and L.types[UP_EXPS] in ggml.FLOAT_TYPES:
        return None
    pool = StatsStream(tokens, opts.search_tokens, full=False, sample=False)
    for x in inputs():
        with timed("stats"):
            pool.add(x)
    with timed("stats"):
        mean_abs = pool.result().mean_abs
    names = [n for n in (GATE_EXPS, UP_EXPS) if L.types[n] not in ggml.FLOAT_TYPES]
    cands = moe.norm_candidates(mean_abs, [L.w[n][e].numpy() for e in range(hp.n_expert) for n in names])
    losses = np.zeros(len(cands), np.float64)
    for e in range(hp.n_expert):
        if not counts[e]:
            continue  # its output error is over no token
        st = stream(e, lambda x: x, False, True)
        assert st.h_sample is not None
        sampled = -(-st.tokens // max(1, st.tokens // opts.search_tokens))  # rows in h_sample
        weights = [(L.w[n][e].numpy(), L.types[n]) for n in names]
        with timed("solve"):  # the sample's error, per routed token of the expert
            losses += moe.candidate_losses(cands, weights, st.h_sample, st.mean_sq, int(counts[e]) / sampled)
    best = cands[int(np.argmin(losses))]  # the first of equal losses: the unscaled one before all
    L.rep.alphas["ffn_norm"] = best.exponents
    moe.fold_norm(L.w, torch.from_numpy(best.scales))
    L.refresh("ffn_norm", qwen3.ROUTER, GATE_EXPS, UP_EXPS)
    return best.scales


def solve_layers(
    ckpt: Checkpoint,
    tokens: np.ndarray,
    types: dict[str, str],
    opts: SolverOptions,
    report: Callable[[LayerReport], None] | None = None,
) -> Iterator[tuple[int, LayerResult]]:
    """Yield (layer, result) layer after layer; ``tokens`` (nsamples, seqlen)."""
    check_targets(types, opts.method)
    hp = ckpt.hparams
    opts = fit_memory(opts, hp, tokens.shape[0], tokens.shape[1])  # --max-memory: batch, residual file
    rope = qwen3.Rope.build(hp, tokens.shape[1], opts.device)
    shape = (tokens.shape[0], tokens.shape[1], hp.n_embd)
    h = Residual(shape, opts.device, spill=4 * math.prod(shape) > opts.max_residual_bytes)
    try:
        with torch.no_grad():
            for i in range(0, shape[0], opts.batch):  # (nsamples, seqlen, n_embd), a batch at a time
                h.write(i, qwen3.embed(ckpt, torch.from_numpy(tokens[i : i + opts.batch])).to(opts.device))
            for i in range(hp.n_layer):
                start = time.perf_counter()
                rep = LayerReport(i, devices=solver_devices(opts.device))
                with clock(rep.times):
                    with timed("load"):
                        w = qwen3.load_layer(ckpt, i)
                    _, result = solve_layer(h, w, hp, rope, types, opts, rep)
                rep.seconds = time.perf_counter() - start
                if report:
                    report(rep)
                yield i, result
            name = head_tensor(types) if opts.solve_head else None
            if name is not None:
                del w, result  # the last layer's weights are not held through the head
                yield HEAD, _solve_head(ckpt, h, hp, types[name], name, opts, int(tokens.size))
    finally:
        h.close()


def _solve_head(
    ckpt: Checkpoint, h: Residual, hp: HParams, type_name: str, name: str, opts: SolverOptions, n_tok: int
) -> LayerResult:
    """The head (solvers/head.py) on the final hidden states of the quantized layers."""
    norm = torch.from_numpy(ckpt.load("output_norm.weight")).to(opts.device)
    acc: torch.Tensor | None = None
    with torch.no_grad(), fixed_order():
        for i in range(0, h.shape[0], opts.batch):
            x = qwen3.rms_norm(h.read(i, min(i + opts.batch, h.shape[0])), norm, hp.rms_eps)
            acc = gram(x, into=acc)
    assert acc is not None
    hh = acc.cpu().numpy()
    data = head.solve_head(ckpt, name, type_name, hh, n_tok, opts.kind.uses_gptq, opts.damp, opts.act_order)
    return LayerResult({name: data}, {})
