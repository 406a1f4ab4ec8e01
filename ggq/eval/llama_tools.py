"""llama.cpp's own `llama-perplexity --kl-divergence`, run and read: the reference ggq's quants
are judged by (tools/bench_quality.py, the demo, tests).

At this pin the tool's asynchronous logger can exit with its last lines unprinted (about one run
in ten, exit code 0; llama.cpp issue 22142), so a run whose summary is missing is repeated.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ggq import native

KLD_FIELDS = {
    "ppl": r"Mean PPL\(Q\)\s*:\s*([0-9.]+)",
    "ppl_base": r"Mean PPL\(base\)\s*:\s*([0-9.]+)",
    "kld": r"Mean\s+KLD:\s+([0-9.]+)",
    "top1": r"Same top p:\s+([0-9.]+)",  # percent
}
# every statistic of the summary, as "name: value" (± uncertainty); values in % stay in %
_NUM = r"(-?[0-9.]+)"
KLD_STATS = {
    "ppl": (r"Mean PPL\(Q\)\s*:\s*" + _NUM + r"\s*±\s*" + _NUM),
    "ppl_base": (r"Mean PPL\(base\)\s*:\s*" + _NUM + r"\s*±\s*" + _NUM),
    "ln_ppl_ratio": (r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*" + _NUM + r"\s*±\s*" + _NUM),
    "kld": (r"Mean\s+KLD:\s*" + _NUM + r"\s*±\s*" + _NUM),
    "kld_max": r"Maximum KLD:\s*" + _NUM,
    "kld_p999": r"99\.9%\s+KLD:\s*" + _NUM,
    "kld_p99": r"99\.0%\s+KLD:\s*" + _NUM,
    "kld_p95": r"95\.0%\s+KLD:\s*" + _NUM,
    "kld_p90": r"90\.0%\s+KLD:\s*" + _NUM,
    "kld_median": r"Median\s+KLD:\s*" + _NUM,
    "dp_mean": (r"Mean\s+Δp:\s*" + _NUM + r"\s*±\s*" + _NUM),
    "dp_max": r"Maximum Δp:\s*" + _NUM,
    "dp_rms": (r"RMS Δp\s*:\s*" + _NUM + r"\s*±\s*" + _NUM),
    "same_top": (r"Same top p:\s*" + _NUM + r"\s*±\s*" + _NUM),
}
FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
ATTEMPTS = 8
T = TypeVar("T")


class LlamaToolError(RuntimeError):
    """llama-perplexity failed or never printed what was asked for."""


def _common(n_ctx: int, chunks: int, threads: int) -> list[str]:
    return ["-c", str(n_ctx), "--chunks", str(chunks), "-t", str(threads)]


def kld_base(f32: Path, text: Path, out: Path, n_ctx: int = 512, chunks: int = 40, threads: int = 2) -> Path:
    """Save the base model's log-probabilities over ``text`` (llama-perplexity --kl-divergence-base)."""
    ppl(f32, text, n_ctx, chunks, threads, kl_divergence_base=out)
    return out


def ppl(
    model: Path,
    text: Path,
    n_ctx: int = 512,
    chunks: int = 40,
    threads: int = 2,
    n_batch: int | None = None,
    kl_divergence_base: Path | None = None,
) -> tuple[float, float]:
    """Plain llama-perplexity over ``text``: its "Final estimate" (PPL, ±); with
    ``kl_divergence_base`` the same run also saves the base log-probs there (kld_base). This is
    the base PPL to subtract from a --kl-divergence run's "Mean PPL(Q)": that run's "Mean
    PPL(base)" is computed from the 16-bit stored base log-probs (those more than 16 below the
    max clamped), so it reads low (qwen3-micro F32, held-out, 232 chunks: 87.529 against 89.058)."""
    cmd = [str(native.tool_path("llama-perplexity")), "-m", str(model), "-f", str(text)]
    cmd += [*_common(n_ctx, chunks, threads), *(["-b", str(n_batch)] if n_batch else [])]
    if kl_divergence_base is not None:
        cmd += ["--kl-divergence-base", str(kl_divergence_base)]

    def final(log: str) -> tuple[float, float] | None:
        m = FINAL.search(log)
        saved = kl_divergence_base is None or kl_divergence_base.is_file()
        return (float(m.group(1)), float(m.group(2))) if m and saved else None

    found, log = run_for(cmd, final)
    if found is None:
        raise LlamaToolError(f"llama-perplexity gave no final estimate for {model}:\n{log[-3000:]}")
    return found


def parse_kld_stats(log: str) -> dict[str, float]:
    """Every statistic of llama-perplexity's --kl-divergence summary; "X_err" for each "± Y".

    Percent values (Δp, same top p) are converted to fractions. Raises LlamaToolError when the
    summary is incomplete.
    """
    out: dict[str, float] = {}
    for key, pattern in KLD_STATS.items():
        m = re.search(pattern, log)
        if m is None:
            raise LlamaToolError(f"no {key!r} in the llama-perplexity summary")
        scale = 0.01 if key.startswith(("dp_", "same_top")) else 1.0
        out[key] = float(m.group(1)) * scale
        if m.lastindex == 2:
            out[key + "_err"] = float(m.group(2)) * scale
    return out


def run_for(cmd: list[str], parse: Callable[[str], T | None]) -> tuple[T | None, str]:
    """Run a llama.cpp tool until ``parse`` finds its result in the log (at most ATTEMPTS runs:
    a log can lose its last lines, see above); (result or None, the last log)."""
    log = ""
    for _ in range(ATTEMPTS):
        done = subprocess.run(cmd, capture_output=True, text=True)
        log = done.stdout + done.stderr
        if done.returncode != 0:
            break
        found = parse(log)
        if found is not None:
            return found, log
    return None, log


def _kld_run(
    model: Path, base: Path, n_ctx: int, chunks: int, threads: int, parse: Callable[[str], T | None]
) -> T:
    cmd = [str(native.tool_path("llama-perplexity")), "-m", str(model), "--kl-divergence-base", str(base)]
    found, log = run_for([*cmd, "--kl-divergence", *_common(n_ctx, chunks, threads)], parse)
    if found is None:
        raise LlamaToolError(f"llama-perplexity --kl-divergence gave no summary for {model}:\n{log[-3000:]}")
    return found


def _try_stats(log: str) -> dict[str, float] | None:
    try:
        return parse_kld_stats(log)
    except LlamaToolError:
        return None


def _summary(log: str) -> dict[str, float] | None:
    found = {key: re.search(pattern, log) for key, pattern in KLD_FIELDS.items()}
    return {key: float(m.group(1)) for key, m in found.items() if m} if all(found.values()) else None


def kld_stats(
    model: Path, base: Path, n_ctx: int = 512, chunks: int = 40, threads: int = 2
) -> dict[str, float]:
    """The whole --kl-divergence summary of ``model`` against a ``kld_base`` file (parse_kld_stats)."""
    return _kld_run(model, base, n_ctx, chunks, threads, _try_stats)


def kld(model: Path, base: Path, n_ctx: int = 512, chunks: int = 40, threads: int = 2) -> dict[str, float]:
    """PPL of ``model``, mean KLD and same-top-1 (%) against a ``kld_base`` file; "ppl_base" is the
    tool's Mean PPL(base), from the stored 16-bit log-probs (see :func:`ppl` for the plain one)."""
    return _kld_run(model, base, n_ctx, chunks, threads, _summary)
