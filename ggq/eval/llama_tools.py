"""llama.cpp's programs, run and read: :func:`run` is how ggq runs every one of them (study's
llama-quantize and llama-imatrix, bench's llama-bench, the zero-shot tasks), and
`llama-perplexity --kl-divergence` is the reference ggq's quants are judged by
(tools/bench_quality.py, the demo, tests).

At this pin the tools' asynchronous logger can exit with its last lines unprinted (about one run
in ten, exit code 0; llama.cpp issue 22142), so a run whose result is missing from its log is
repeated (:func:`run_for`).
"""

from __future__ import annotations

import re
import subprocess
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ggq import native
from ggq.errors import GGQError

_NUM = r"(-?[0-9.]+)"
_PM = _NUM + r"\s*±\s*" + _NUM  # value ± uncertainty
# every statistic of the --kl-divergence summary: its line (a second group: the ± of the first)
# and whether the tool prints it in percent
KLD_STATS = {
    "ppl": (r"Mean PPL\(Q\)\s*:\s*" + _PM, False),
    "ppl_base": (r"Mean PPL\(base\)\s*:\s*" + _PM, False),
    "ln_ppl_ratio": (r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*" + _PM, False),
    "kld": (r"Mean\s+KLD:\s*" + _PM, False),
    "kld_max": (r"Maximum KLD:\s*" + _NUM, False),
    "kld_p999": (r"99\.9%\s+KLD:\s*" + _NUM, False),
    "kld_p99": (r"99\.0%\s+KLD:\s*" + _NUM, False),
    "kld_p95": (r"95\.0%\s+KLD:\s*" + _NUM, False),
    "kld_p90": (r"90\.0%\s+KLD:\s*" + _NUM, False),
    "kld_median": (r"Median\s+KLD:\s*" + _NUM, False),
    "dp_mean": (r"Mean\s+Δp:\s*" + _PM, True),
    "dp_max": (r"Maximum Δp:\s*" + _NUM, True),
    "dp_rms": (r"RMS Δp\s*:\s*" + _PM, True),
    "same_top": (r"Same top p:\s*" + _PM, True),
}
# kld()'s short summary: its names for four of the statistics, values as printed (top1 in %)
KLD_BRIEF = {"ppl": "ppl", "ppl_base": "ppl_base", "kld": "kld", "top1": "same_top"}
FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
ATTEMPTS = 8
T = TypeVar("T")


class LlamaToolError(GGQError, RuntimeError):
    """llama-perplexity failed or never printed what was asked for."""


@dataclass(frozen=True)
class ToolRun:
    """A finished run of a llama.cpp program."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def log(self) -> str:
        return self.stdout + self.stderr


def run(cmd: Sequence[str], watch: Callable[[int], None] | None = None, every_s: float = 0.02) -> ToolRun:
    """Run a llama.cpp program to its end, reading both pipes as it writes (a full pipe would stall
    it); ``watch(pid)`` is called every ``every_s`` seconds while it runs (bench samples its peak
    memory). An exception while it runs (Ctrl-C, SIGTERM) kills it."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        done = threading.Event()

        def sample(watch: Callable[[int], None]) -> None:
            while not done.is_set():
                watch(proc.pid)
                done.wait(every_s)

        sampler = None if watch is None else threading.Thread(target=sample, args=(watch,), daemon=True)
        if sampler is not None:
            sampler.start()
        try:
            out, err = proc.communicate()
        except BaseException:
            proc.kill()
            raise
        finally:
            done.set()
            if sampler is not None:
                sampler.join()
    return ToolRun(proc.returncode, out, err)


def run_for(cmd: list[str], parse: Callable[[str], T | None]) -> tuple[T | None, str]:
    """Run a llama.cpp tool until ``parse`` finds its result in the log (at most ATTEMPTS runs:
    a log can lose its last lines, see above); (result or None, the last log)."""
    log = ""
    for _ in range(ATTEMPTS):
        done = run(cmd)
        log = done.log
        if done.returncode != 0:
            break
        found = parse(log)
        if found is not None:
            return found, log
    return None, log


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


def _find(log: str, keys: Iterable[str]) -> dict[str, re.Match[str]]:
    """The summary lines of the statistics ``keys``; LlamaToolError naming the first one missing."""
    found = {}
    for key in keys:
        m = re.search(KLD_STATS[key][0], log)
        if m is None:
            raise LlamaToolError(f"no {key!r} in the llama-perplexity summary")
        found[key] = m
    return found


def parse_kld_stats(log: str) -> dict[str, float]:
    """Every statistic of llama-perplexity's --kl-divergence summary; "X_err" for each "± Y".

    Percent values (Δp, same top p) are converted to fractions. Raises LlamaToolError when the
    summary is incomplete.
    """
    out: dict[str, float] = {}
    for key, m in _find(log, KLD_STATS).items():
        scale = 0.01 if KLD_STATS[key][1] else 1.0
        out[key] = float(m.group(1)) * scale
        if m.lastindex == 2:
            out[key + "_err"] = float(m.group(2)) * scale
    return out


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
    try:
        found = _find(log, KLD_BRIEF.values())
    except LlamaToolError:
        return None
    return {name: float(found[key].group(1)) for name, key in KLD_BRIEF.items()}


def kld_stats(
    model: Path, base: Path, n_ctx: int = 512, chunks: int = 40, threads: int = 2
) -> dict[str, float]:
    """The whole --kl-divergence summary of ``model`` against a ``kld_base`` file (parse_kld_stats)."""
    return _kld_run(model, base, n_ctx, chunks, threads, _try_stats)


def kld(model: Path, base: Path, n_ctx: int = 512, chunks: int = 40, threads: int = 2) -> dict[str, float]:
    """PPL of ``model``, mean KLD and same-top-1 (%) against a ``kld_base`` file; "ppl_base" is the
    tool's Mean PPL(base), from the stored 16-bit log-probs (see :func:`ppl` for the plain one)."""
    return _kld_run(model, base, n_ctx, chunks, threads, _summary)
