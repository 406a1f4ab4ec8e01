"""Perplexity exactly as llama.cpp's ``llama-perplexity`` computes it.

The protocol (tools/perplexity/perplexity.cpp, ``perplexity()``): the whole text is tokenized
once (special tokens as plain text, BOS added when the model adds it); it is cut into
``n_tokens // n_ctx`` chunks of n_ctx tokens; each chunk is evaluated from an empty KV cache with
its first token replaced by BOS when the model adds BOS; only the second half of each chunk is
scored, every token by the NLL of a log-softmax over the whole vocabulary. PPL = exp(mean NLL)
and its uncertainty is PPL * sqrt(var(NLL) / (count - 1)). Evaluation and the per-token loop run
in ``ggq._native``; this module checks the inputs and drives the chunks.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ggq import native
from ggq.errors import GGQError
from ggq.eval.kld import KldAccumulator, KldStats
from ggq.gguf import check_model_file

DEFAULT_TEXT = Path(__file__).resolve().parent.parent / "data" / "wikitext-2-raw" / "wiki.test.raw"


class PerplexityError(GGQError, ValueError):
    """Input that cannot give a perplexity; the message names the file, option or chunk at fault."""


@dataclass(frozen=True)
class PerplexityConfig:
    n_ctx: int = 512
    n_batch: int = 2048  # llama-perplexity's default: 4 chunks of 512 side by side per decode
    n_chunks: int | None = None  # None: every whole chunk of the text
    n_threads: int = 0  # 0: every core this process may use
    n_ubatch: int = 512
    n_gpu_layers: int = -1  # llama.cpp's default: every layer on the GPU where there is one


@dataclass(frozen=True)
class ChunkProgress:
    done: int  # chunks evaluated so far
    total: int
    ppl: float  # over the chunks done


@dataclass(frozen=True)
class PerplexityResult:
    model: str
    n_ctx: int
    n_batch: int
    n_seq: int  # chunks decoded side by side
    n_chunks: int
    n_text_tokens: int
    n_scored: int  # tokens scored in all
    nll: float  # mean negative log-likelihood, nats
    ppl: float
    ppl_err: float  # as llama-perplexity's "Final estimate: PPL = X +/- Y"
    seconds: float  # evaluation and scoring, model loading and tokenization excluded

    @property
    def tokens_per_second(self) -> float:
        return self.n_scored / self.seconds if self.seconds > 0 else math.inf


def load_text(path: Path | None = None) -> bytes:
    """The bytes llama-perplexity evaluates for ``-f path``: the file, less one final newline.

    The default is the WikiText-2 raw test split shipped with ggq.
    """
    path = DEFAULT_TEXT if path is None else path
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PerplexityError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PerplexityError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}: {exc.reason})"
        ) from exc
    return data[:-1] if data.endswith(b"\n") else data


def ppl_estimate(nll_sum: float, nll2_sum: float, count: int) -> tuple[float, float]:
    """(PPL, its uncertainty) from the sums of NLL and NLL^2, with llama-perplexity's formulas.

    The uncertainty is NaN where llama-perplexity reports a negative variance instead.
    """
    mean = nll_sum / count
    var = nll2_sum / count - mean * mean
    ppl = math.exp(mean)
    return ppl, (math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else math.nan)


def resolve_threads(n_threads: int) -> int:
    if n_threads > 0:
        return n_threads
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_model(path: Path, n_ctx: int, n_gpu_layers: int = -1) -> Any:
    """The model as ``ggq._native.Model``, after the file checks."""
    check_model_file(path, n_ctx)
    native.check_gpu_layers(n_gpu_layers)
    mod = native.load()
    try:
        model = mod.Model(str(path), n_gpu_layers)
    except mod.LlamaError as exc:
        raise PerplexityError(str(exc)) from exc
    if model.add_eos:
        raise PerplexityError(
            f"{path}: the model adds EOS to every text; llama-perplexity rejects such models"
        )
    return model


def tokenize(model: Any, text: bytes, n_ctx: int, source: str) -> np.ndarray:
    """llama-perplexity's tokenization: BOS when the model adds it, special-token text kept as text."""
    tokens = model.tokenize(text, add_special=True, parse_special=False)  # (n_tokens,) int32
    if len(tokens) < 2 * n_ctx:
        raise PerplexityError(
            f"{source}: {len(tokens)} tokens; -c {n_ctx} needs at least {2 * n_ctx} (two chunks)"
        )
    return tokens


def chunk_groups(tokens: np.ndarray, n_ctx: int, n_chunks: int, n_seq: int) -> Iterator[np.ndarray]:
    """Consecutive groups of up to n_seq chunks, each (k, n_ctx), as one decode call takes them."""
    for i in range(0, n_chunks, n_seq):
        k = min(n_seq, n_chunks - i)
        yield tokens[i * n_ctx : (i + k) * n_ctx].reshape(k, n_ctx)


def _check_finite(nll: np.ndarray, path: Path, chunk0: int, first: int) -> None:
    bad = ~np.isfinite(nll)  # (k, n_scored)
    if bad.any():
        c, r = np.argwhere(bad)[0]
        raise PerplexityError(
            f"{path}: NaN/Inf logits for {int(bad.sum())} of {nll.size} scored tokens in chunks "
            f"{chunk0 + 1}-{chunk0 + len(nll)} (first: chunk {chunk0 + c + 1}, position {first + r}); "
            "the model's output is broken and its perplexity undefined"
        )


@dataclass(frozen=True)
class Run:
    """A model loaded, the text tokenized, a context made: everything before the first chunk."""

    path: Path
    evaluator: Any  # ggq._native.Evaluator, holding the model
    tokens: np.ndarray  # (n_text_tokens,) int32
    n_chunks: int
    n_threads: int


def prepare(path: Path, text: bytes, config: PerplexityConfig, source: str = "text") -> Run:
    """Every check and load that can fail on bad input, before any chunk is evaluated."""
    model = load_model(path, config.n_ctx, config.n_gpu_layers)
    tokens = tokenize(model, text, config.n_ctx, source)
    n_chunks = len(tokens) // config.n_ctx
    if config.n_chunks is not None:
        n_chunks = min(n_chunks, config.n_chunks)
    threads = resolve_threads(config.n_threads)
    n_ubatch = min(config.n_ubatch, config.n_batch)
    ev = native.load().Evaluator(model, config.n_ctx, config.n_batch, n_ubatch, threads)
    return Run(path, ev, tokens, n_chunks, threads)


def _result(r: Run, nll_sum: float, nll2_sum: float, count: int, seconds: float) -> PerplexityResult:
    ev = r.evaluator
    ppl, err = ppl_estimate(nll_sum, nll2_sum, count)
    return PerplexityResult(
        model=str(r.path),
        n_ctx=ev.n_ctx,
        n_batch=ev.n_batch,
        n_seq=ev.n_seq,
        n_chunks=r.n_chunks,
        n_text_tokens=len(r.tokens),
        n_scored=count,
        nll=nll_sum / count,
        ppl=ppl,
        ppl_err=err,
        seconds=seconds,
    )


def run(r: Run, progress: Callable[[ChunkProgress], None] | None = None) -> PerplexityResult:
    """Evaluate and score the chunks; NaN/Inf logits stop the run with the chunk named."""
    ev = r.evaluator
    nll_sum = nll2_sum = 0.0
    count = done = 0
    start = time.perf_counter()
    for group in chunk_groups(r.tokens, ev.n_ctx, r.n_chunks, ev.n_seq):
        ev.evaluate(group)
        nll = ev.nll(r.n_threads)  # (k, n_scored) float64
        _check_finite(nll, r.path, done, ev.first)
        nll_sum += float(nll.sum())
        nll2_sum += float(np.square(nll).sum())
        count += nll.size
        done += len(group)
        if progress is not None:
            progress(ChunkProgress(done, r.n_chunks, math.exp(nll_sum / count)))
    return _result(r, nll_sum, nll2_sum, count, time.perf_counter() - start)


@dataclass(frozen=True)
class Compared:
    """A model evaluated against the base: its perplexity and llama-perplexity's KLD statistics."""

    result: PerplexityResult
    kld: KldStats


def check_same_text(base: Run, r: Run) -> None:
    """A KL-divergence needs the same vocabulary and the same tokens in both models."""
    nb, nq = base.evaluator.n_vocab, r.evaluator.n_vocab
    if nb != nq:
        raise PerplexityError(
            f"{r.path}: vocabulary of {nq} tokens, but the base {base.path} has {nb}; "
            "a KL-divergence needs the same vocabulary"
        )
    if not np.array_equal(
        base.tokens[: base.n_chunks * base.evaluator.n_ctx], r.tokens[: r.n_chunks * r.evaluator.n_ctx]
    ):
        raise PerplexityError(f"{r.path}: tokenizes the text differently from the base {base.path}")


def run_against_base(
    base: Run,
    runs: list[Run],
    progress: Callable[[int, int, list[tuple[float, float]]], None] | None = None,
) -> tuple[PerplexityResult, list[Compared]]:
    """One pass over the chunks: the base and every model evaluate each group of chunks, then each
    model's logits are compared with the base's in ``ggq._native`` (nothing is written to disk).

    Returns the base's own perplexity (the plain protocol) and, per model, its perplexity and KLD
    statistics as ``llama-perplexity --kl-divergence`` prints them. ``progress(done, total,
    [(PPL, mean KLD) per model])`` after every group.
    """
    for r in runs:
        check_same_text(base, r)
    ev_b = base.evaluator
    accs = [KldAccumulator() for _ in runs]
    seconds = [0.0] * len(runs)
    b_sum = b_sum2 = 0.0
    b_count = done = 0
    b_seconds = 0.0
    for group in chunk_groups(base.tokens, ev_b.n_ctx, base.n_chunks, ev_b.n_seq):
        t0 = time.perf_counter()
        ev_b.evaluate(group)
        b_seconds += time.perf_counter() - t0
        nll: np.ndarray | None = None  # the base's plain NLL: a by-product of the first comparison
        for i, r in enumerate(runs):
            t0 = time.perf_counter()
            r.evaluator.evaluate(group)
            tokens = r.evaluator.kld(ev_b, r.n_threads)
            if nll is None:
                nll = tokens["nll_base_exact"]
                _check_finite(nll, base.path, done, ev_b.first)
            _check_finite(tokens["kld"], r.path, done, ev_b.first)
            accs[i].add(tokens)
            seconds[i] += time.perf_counter() - t0
        if nll is None:
            t0 = time.perf_counter()
            nll = ev_b.nll(base.n_threads)
            _check_finite(nll, base.path, done, ev_b.first)
            b_seconds += time.perf_counter() - t0
        b_sum += float(nll.sum())
        b_sum2 += float(np.square(nll).sum())
        b_count += nll.size
        done += len(group)
        if progress is not None:
            progress(done, base.n_chunks, [a.running() for a in accs])
    compared = []
    for r, acc, sec in zip(runs, accs, seconds, strict=True):
        stats = acc.stats()
        nll_q = np.concatenate(acc.parts["nll"])
        res = _result(
            r,
            float(nll_q.sum(dtype=np.float64)),
            float(np.square(nll_q.astype(np.float64)).sum()),
            len(nll_q),
            sec,
        )
        compared.append(Compared(res, stats))
    return _result(base, b_sum, b_sum2, b_count, b_seconds), compared


def perplexity(
    path: Path,
    text: bytes,
    config: PerplexityConfig = PerplexityConfig(),
    progress: Callable[[ChunkProgress], None] | None = None,
    source: str = "text",
) -> PerplexityResult:
    """llama-perplexity's "Final estimate" for one model file over ``text`` (see :func:`load_text`)."""
    return run(prepare(path, text, config, source), progress)
