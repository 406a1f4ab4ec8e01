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

Device: the forward passes, the input statistics (X^T X, mean |x|, mean x^2) and AWQ's search
products run on ``SolverOptions.device`` (torch); the ggml encoders and the GPTQ column loop run
on the CPU in numpy. The layer's weights live on the CPU (what the encoders read) with one device
copy, refreshed only when a weight changes (fold, quantize, refit). On the CPU both are the same
tensors and the results are those of the plain CPU code, bit for bit.

Threads: the long sums (X^T X, AWQ's losses and refit) are taken in a fixed order and the
factorizations (GPTQ's inverse Cholesky, the refit's solve) on one thread (reductions.py), so
the bytes on the CPU do not depend on torch's, MKL's or the encoders' thread counts.

Each linear's input energy (sum of x^2 per input column and the token count, llama.cpp's imatrix
entry) is taken from the input it reads in the written model: with AWQ the folded model's, with
the quantized tensors before it, and the refit norms applied.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from ggq import ggml, qwen3
from ggq.checkpoint import Checkpoint, HParams
from ggq.solvers import awq
from ggq.solvers.gptq import Target, gptq
from ggq.solvers.options import LayerReport, SolverError, SolverOptions, check_targets, clock, timed
from ggq.solvers.reductions import gram


def hessian(x: torch.Tensor) -> np.ndarray:
    """sum over tokens of x x^T, in float64: (n_in, n_in), the same bits at any thread count."""
    return gram(x).cpu().numpy()


@dataclass(frozen=True)
class InputStats:
    """What the solvers need of one input X (tokens, n_in)."""

    mean_abs: np.ndarray  # (n_in,) AWQ's salience
    mean_sq: np.ndarray  # (n_in,) importance, as llama.cpp's imatrix stores it
    sum_sq: np.ndarray  # (n_in,) float64 sum of x^2 over all tokens (an imatrix entry), from mean_sq
    tokens: int
    h_sample: torch.Tensor  # (n_in, n_in) float32 sum of x x^T over evenly strided tokens, on x's device
    h_full: np.ndarray | None  # (n_in, n_in) float64 over all tokens, for GPTQ

    @classmethod
    def of(cls, x: torch.Tensor, search_tokens: int, full: bool) -> InputStats:
        flat = x.reshape(-1, x.shape[-1])  # (tokens, n_in)
        sample = flat[:: max(1, flat.shape[0] // search_tokens)]
        mean_sq = flat.pow(2).mean(0).cpu().numpy()
        return cls(
            mean_abs=flat.abs().mean(0).cpu().numpy().astype(np.float64),
            mean_sq=mean_sq,
            sum_sq=mean_sq.astype(np.float64) * flat.shape[0],  # float32 precision, as llama-imatrix sums
            tokens=flat.shape[0],
            h_sample=gram(sample, torch.float32).to(torch.float32),
            h_full=hessian(x) if full else None,
        )

    @property
    def h(self) -> np.ndarray:
        return self.h_full if self.h_full is not None else self.h_sample.to(torch.float64).cpu().numpy()


def _rel_error(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    """||X (W - Q)^T|| / ||X W^T|| from the Hessian: tr(E H E^T) / tr(W H W^T), square-rooted."""
    e = (w - q).astype(np.float64)
    num = float(np.sum((e @ h) * e))
    den = float(np.sum((w.astype(np.float64) @ h) * w))
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, batch: int) -> torch.Tensor:
    with timed("forward"):
        return torch.cat([fn(h[i : i + batch]) for i in range(0, h.shape[0], batch)])


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
    unquantized: dict[str, np.ndarray] = field(default_factory=dict)  # linear -> (folded) weights
    dev: dict[str, torch.Tensor] = field(default_factory=dict)  # the weights on opts.device
    # linear -> (sum of x^2 per input column, tokens) of the input it reads in the written model
    act_sums: dict[str, tuple[np.ndarray, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.refresh(*self.w)

    def refresh(self, *names: str) -> None:
        """Copy changed weights to the device (on the CPU the copy is the tensor itself)."""
        for n in names:
            self.dev[n] = self.w[n].to(self.opts.device)

    def set(self, name: str, value: torch.Tensor) -> None:
        self.w[name] = value
        self.refresh(name)

    def stats(self, x: torch.Tensor) -> InputStats:
        with timed("stats"):
            return InputStats.of(x, self.opts.search_tokens, full=self.opts.kind.uses_gptq)

    def scale(self, prev: str, x: Callable[[], torch.Tensor]) -> bool:
        """AWQ: search the scales of the group fed by ``prev`` on its linears' input ``x()`` and
        fold them in; False (nothing done) for gptq or a group without quantized linears."""
        group = next(g for g in awq.QWEN3_GROUPS if g.prev == prev)
        quantized = [n for n in group.linears if self.types[n] not in ggml.FLOAT_TYPES]
        if not self.opts.kind.scales_activations or not quantized:
            return False
        xs = x()
        with timed("stats"):
            stats = InputStats.of(xs, self.opts.search_tokens, full=False)
        with timed("solve"):
            self._search(group, quantized, xs.shape[-1], stats)
        return True

    def _search(self, group: awq.ScaleGroup, quantized: list[str], n_in: int, stats: InputStats) -> None:
        hp, prev = self.hp, group.prev
        channel = awq.channel_map(group, n_in, hp.n_head, hp.n_head_kv, hp.head_dim)
        weights = [(self.w[n].numpy(), self.types[n]) for n in quantized]
        found = awq.search_scales(
            weights, stats.h_sample, stats.mean_abs, stats.mean_sq, channel, self.opts.awq_grid
        )
        if self.opts.refine_scales:
            found = awq.refine_scales(weights, stats.h_sample, stats.mean_sq, channel, found)
        self.rep.alphas[prev] = found.exponents
        awq.fold(self.w, group, torch.from_numpy(found.scales), channel)
        self.refresh(group.prev, *group.linears)
        for n in group.linears:
            self.col_scale[n] = found.scales[channel]

    def quantize(self, names: tuple[str, ...], stats: InputStats) -> None:
        """Encode linears reading the input of ``stats``; their weights become the decoded ones."""
        for name in names:
            t, wn = self.types[name], self.w[name].numpy()
            if t in ggml.FLOAT_TYPES:
                with timed("encode"):
                    data = ggml.quantize(wn, t)
                    q = ggml.dequantize(data, t, wn.shape[1])
            elif self.opts.kind.uses_gptq:
                assert stats.h_full is not None
                with timed("solve"):
                    res = gptq(
                        wn, stats.h_full, Target(t), damp=self.opts.damp, act_order=self.opts.act_order
                    )
                data, q = res.data, res.weights
                self.rep.damp[name] = res.damp
            else:
                with timed("solve"):
                    wc = awq.clip_search(wn, t, stats.mean_sq, stats.h_sample) if self.opts.clip else wn
                with timed("encode"):
                    data = ggml.quantize(wc, t, stats.mean_sq, n_threads=0)
                    q = ggml.dequantize(data, t, wn.shape[1])
            if t not in ggml.FLOAT_TYPES:
                with timed("diag"):
                    s = self.col_scale.get(name, np.ones(wn.shape[1], np.float32))
                    rtn = awq.quantized_weights(wn / s, t, None) * s  # plain RTN of the unscaled weights
                    self.rep.errors[name] = (_rel_error(wn, rtn, stats.h), _rel_error(wn, q, stats.h))
            self.out[name] = data
            self.unquantized[name] = wn
            self.act_sums[name] = (stats.sum_sq, stats.tokens)
            self.set(name, torch.from_numpy(q))

    def refit(self, norm: str, names: tuple[str, ...], stats: InputStats) -> bool:
        """AWQ: the norm feeding the quantized ``names`` refit by least squares (awq.refit_norm)."""
        if not (self.opts.kind.scales_activations and self.opts.refit_norms):
            return False
        pairs = [(self.unquantized[n], self.w[n].numpy()) for n in names]
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
    act_sums: dict[str, tuple[np.ndarray, int]]


def solve_layer(
    h: torch.Tensor,
    w: dict[str, torch.Tensor],
    hp: HParams,
    rope: qwen3.Rope,
    types: dict[str, str],
    opts: SolverOptions,
    rep: LayerReport,
) -> tuple[torch.Tensor, LayerResult]:
    """One layer, true-sequential, ``h`` (B, T, n_embd) on ``opts.device`` and ``w`` on the CPU:
    returns the quantized layer's output and its result."""
    L = _Layer(w, {n: types[f"blk.{rep.layer}.{n}.weight"] for n in w}, hp, opts, rep)
    d = L.dev  # the forward reads the device copy, kept current by L

    def attn_in(b: torch.Tensor) -> torch.Tensor:
        return qwen3.attention_input(b, d, hp)

    def o_in(b: torch.Tensor) -> torch.Tensor:  # b: the attention input
        return qwen3.attention_core(b, d, hp, rope)

    x = _batched(attn_in, h, opts.batch)
    if L.scale("attn_norm", lambda: x):
        x = _batched(attn_in, h, opts.batch)  # with the folded norm, as llama.cpp will compute it
    st = L.stats(x)
    L.quantize(("attn_q", "attn_k"), st)
    L.scale("attn_v", lambda: _batched(o_in, x, opts.batch))  # v is unquantized until folded into
    L.quantize(("attn_v",), st)
    if L.refit("attn_norm", ("attn_q", "attn_k", "attn_v"), st):
        x = _batched(attn_in, h, opts.batch)  # the norm changed; otherwise x is still current
    x = _batched(o_in, x, opts.batch)
    L.quantize(("attn_output",), L.stats(x))

    def forward(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        with timed("forward"):
            return fn()

    h = forward(lambda: h + x @ d["attn_output"].T)
    x = forward(lambda: qwen3.mlp_input(h, d, hp))
    if L.scale("ffn_norm", lambda: x):
        x = forward(lambda: qwen3.mlp_input(h, d, hp))
    st = L.stats(x)
    L.quantize(("ffn_gate",), st)
    L.scale("ffn_up", lambda: forward(lambda: qwen3.mlp_core(x, d)))
    L.quantize(("ffn_up",), st)
    if L.refit("ffn_norm", ("ffn_gate", "ffn_up"), st):
        x = forward(lambda: qwen3.mlp_input(h, d, hp))
    x = forward(lambda: qwen3.mlp_core(x, d))
    L.quantize(("ffn_down",), L.stats(x))
    out = forward(lambda: h + x @ d["ffn_down"].T)  # the quantized layer's output feeds the next layer
    if not torch.isfinite(out).all():
        raise SolverError(f"layer {rep.layer}: NaN/Inf in the calibration activations")
    if opts.kind.scales_activations:
        L.finish_norms()
    return out, LayerResult(L.out, L.act_sums)


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
    rope = qwen3.Rope.build(hp, tokens.shape[1], opts.device)
    with torch.no_grad():
        h = qwen3.embed(ckpt, torch.from_numpy(tokens)).to(opts.device)  # (nsamples, seqlen, n_embd)
        for i in range(hp.n_layer):
            start = time.perf_counter()
            rep = LayerReport(i)
            with clock(rep.times):
                with timed("load"):
                    w = qwen3.load_layer(ckpt, i)
                h, result = solve_layer(h, w, hp, rope, types, opts, rep)
            rep.seconds = time.perf_counter() - start
            if report:
                report(rep)
            yield i, result
