"""KL-divergence of a model against a base model, as ``llama-perplexity --kl-divergence`` reports it.

llama.cpp's tool runs in two steps: the base model writes its log-probabilities to a file (16 bits
per vocabulary entry), then the quantized model is compared with that file. ``ggq ppl --base``
evaluates both models chunk by chunk instead and compares the two logit rows of every token in
``ggq._native`` (``Evaluator.kld``), with the same definitions: the base row is rounded to the same
16-bit codes, the KL sum skips base log-probabilities below -16, and every statistic below is the
formula of tools/perplexity/perplexity.cpp ``kl_divergence()``, down to which sums are float and
which double. Nothing the size of the logits is ever written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

FIELDS = ("kld", "p_diff", "nll", "nll_base", "same_top")


def _mean_and_uncertainty(total: float, total2: float, count: int) -> tuple[float, float]:
    """perplexity.cpp's mean_and_uncertainty(): no uncertainty from 10 values or fewer."""
    if count < 1:
        return 0.0, 0.0
    f = total / count
    df = total2 / count - f * f
    return f, (math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0)


def _covariance(suma: float, sumb: float, sumab: float, count: int) -> float:
    if count < 10:
        return 0.0
    return (sumab / count - (suma / count) * (sumb / count)) / (count - 1)


def _percentile(values: np.ndarray, fraction: float) -> float:
    """perplexity.cpp's percentile() over sorted float32 values, in its float arithmetic."""
    if fraction <= 0:
        return float(values[0])
    if fraction >= 1:
        return float(values[-1])
    p = np.float32(fraction) * np.float32(len(values) - 1)
    ip = int(p)
    p = np.float32(p - np.float32(ip))
    hi = values[min(ip + 1, len(values) - 1)]
    return float((np.float32(1) - p) * values[ip] + p * hi)


def _median(values: np.ndarray) -> float:
    n = len(values)
    if n % 2 == 0:
        return float(np.float32(0.5) * (values[n // 2] + values[n // 2 - 1]))
    return float(values[n // 2])


@dataclass(frozen=True)
class KldStats:
    """llama-perplexity's "Perplexity", "KL divergence" and "Token probability" statistics."""

    n_tokens: int
    ppl: float  # Mean PPL(Q)
    ppl_err: float
    ppl_base: float  # Mean PPL(base), from the 16-bit base log-probs
    ppl_base_err: float
    ln_ppl_ratio: float  # Mean ln(PPL(Q)/PPL(base))
    ln_ppl_ratio_err: float
    ppl_correlation: float  # Cor(ln(PPL(Q)), ln(PPL(base)))
    kld: float  # Mean KLD
    kld_err: float
    kld_median: float
    kld_p90: float
    kld_p95: float
    kld_p99: float
    kld_p999: float
    kld_max: float
    kld_min: float
    dp_mean: float  # Mean Δp (a fraction, not percent)
    dp_mean_err: float
    dp_rms: float  # RMS Δp
    dp_rms_err: float
    dp_max: float  # the largest signed Δp, as llama-perplexity's "Maximum Δp"
    dp_min: float
    same_top: float  # Same top p: fraction of tokens whose most likely next token agrees
    same_top_err: float


@dataclass
class KldAccumulator:
    """Per-token values of the chunks evaluated so far; summarized by :meth:`stats`."""

    parts: dict[str, list[np.ndarray]] = field(default_factory=lambda: {k: [] for k in FIELDS})
    count: int = 0
    nll_sum: float = 0.0  # running sums for progress lines (stats() recomputes everything)
    kld_sum: float = 0.0

    def add(self, tokens: dict[str, np.ndarray]) -> None:
        for k in FIELDS:
            self.parts[k].append(np.asarray(tokens[k]).reshape(-1))
        self.count += self.parts["kld"][-1].size
        self.nll_sum += float(self.parts["nll"][-1].sum(dtype=np.float64))
        self.kld_sum += float(self.parts["kld"][-1].sum())

    def running(self) -> tuple[float, float]:
        """(PPL(Q), mean KLD) so far, for progress lines, without re-reading the chunks done."""
        return math.exp(self.nll_sum / self.count), self.kld_sum / self.count

    def stats(self) -> KldStats:
        a = {k: np.concatenate(v) for k, v in self.parts.items()}
        n = len(a["kld"])
        nll, nll_b = a["nll"], a["nll_base"]  # float32, as the tool keeps them
        s_nll, s_nll2 = float(nll.sum(dtype=np.float64)), float((nll * nll).sum(dtype=np.float64))
        s_b, s_b2 = float(nll_b.sum(dtype=np.float64)), float((nll_b * nll_b).sum(dtype=np.float64))
        s_nb = float((nll * nll_b).sum(dtype=np.float64))
        log_ppl, log_ppl_err = _mean_and_uncertainty(s_nll, s_nll2, n)
        log_base, log_base_err = _mean_and_uncertainty(s_b, s_b2, n)
        cov = _covariance(s_nll, s_b, s_nb, n)
        ratio_var = log_ppl_err**2 + log_base_err**2 - 2.0 * cov
        kld = a["kld"]
        kl_mean, kl_err = _mean_and_uncertainty(float(kld.sum()), float((kld * kld).sum()), n)
        dp = a["p_diff"]
        dp2 = (dp * dp).astype(np.float64)  # float product, kept in double
        dp_mean, dp_err = _mean_and_uncertainty(float(dp.sum(dtype=np.float64)), float(dp2.sum()), n)
        mse, mse_err = _mean_and_uncertainty(float(dp2.sum()), float((dp2 * dp2).sum()), n)
        rms = math.sqrt(mse)
        same = float(a["same_top"].sum()) / n
        kld_sorted = np.sort(kld.astype(np.float32))
        dp_sorted = np.sort(dp)
        denom = log_ppl_err * log_base_err
        return KldStats(
            n_tokens=n,
            ppl=math.exp(log_ppl),
            ppl_err=math.exp(log_ppl) * log_ppl_err,
            ppl_base=math.exp(log_base),
            ppl_base_err=math.exp(log_base) * log_base_err,
            ln_ppl_ratio=log_ppl - log_base,
            ln_ppl_ratio_err=math.sqrt(ratio_var) if ratio_var > 0 else 0.0,
            ppl_correlation=cov / denom if denom > 0 else math.nan,
            kld=kl_mean,
            kld_err=kl_err,
            kld_median=_median(kld_sorted),
            kld_p90=_percentile(kld_sorted, 0.90),
            kld_p95=_percentile(kld_sorted, 0.95),
            kld_p99=_percentile(kld_sorted, 0.99),
            kld_p999=_percentile(kld_sorted, 0.999),
            kld_max=float(kld_sorted[-1]),
            kld_min=float(kld_sorted[0]),
            dp_mean=dp_mean,
            dp_mean_err=dp_err,
            dp_rms=rms,
            dp_rms_err=0.5 / rms * mse_err if rms > 0 else 0.0,
            dp_max=float(dp_sorted[-1]),
            dp_min=float(dp_sorted[0]),
            same_top=same,
            same_top_err=math.sqrt(same * (1.0 - same) / (n - 1)) if n > 1 else 0.0,
        )
