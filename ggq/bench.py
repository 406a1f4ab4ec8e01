"""`ggq bench`: how fast each GGUF runs here and how much memory it takes, side by side.

Speed is llama.cpp's own ``llama-bench`` (built with ggq, same library): prompt processing of
``-p`` tokens (pp512) and generation of ``-n`` tokens (tg128), each repeated ``-r`` times, reported
as the median tokens per second and the spread (min-max) of the repetitions. Memory is the peak
resident set size of that llama-bench process (VmHWM), i.e. weights, KV cache and
compute buffers as llama.cpp allocates them. Files are run one after another, each in its own
process, so one file's pages never count for another.

The point it makes: 4-bit weights are dequantized and multiplied in 16/32-bit, so a smaller type
saves memory and bandwidth (faster generation, which streams every weight per token), while prompt
processing, bound by arithmetic, gains less or nothing.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ggq import native
from ggq.errors import GGQError
from ggq.eval.fileinfo import FileInfo, file_info, type_label
from ggq.eval.llama_tools import run
from ggq.gguf import GGUFFormatError, ModelFileError, check_model_file


class BenchError(GGQError, ValueError):
    """A file or option the benchmark cannot use; names it."""


@dataclass(frozen=True)
class Speed:
    test: str  # "pp512" / "tg128", as llama-bench names them
    median: float  # tokens per second
    low: float  # slowest repetition
    high: float  # fastest repetition
    samples: list[float]


@dataclass(frozen=True)
class BenchResult:
    file: str
    info: FileInfo
    n_params: int
    speeds: list[Speed]
    peak_rss_mib: float
    backends: str
    threads: int


def _speed(entry: dict[str, Any]) -> Speed:
    samples = [float(x) for x in entry["samples_ts"]]
    test = f"pp{entry['n_prompt']}" if entry["n_prompt"] else f"tg{entry['n_gen']}"
    return Speed(test, statistics.median(samples), min(samples), max(samples), samples)


def _vm_hwm_mib(pid: int) -> float | None:
    """VmHWM (the peak resident set of the process's current image) from /proc, or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError):
        return None
    return None


@dataclass(frozen=True)
class BenchConfig:
    """What llama-bench runs: prompt and generated tokens, repetitions, threads (0: all cores
    this process may use), layers on the GPU (-1: all)."""

    n_prompt: int = 512
    n_gen: int = 128
    repetitions: int = 5
    threads: int = 0
    n_gpu_layers: int = -1


def run_llama_bench(path: Path, cfg: BenchConfig) -> tuple[list[dict[str, Any]], float]:
    """llama-bench's JSON records for one file and the process's peak RSS in MiB.

    The peak is VmHWM, sampled every 20 ms while the process runs (it only grows, so the last
    sample holds the peak up to then). Not getrusage: Linux keeps a child's maxrss across exec,
    so it would start at this (much larger) Python process's size.
    """
    cmd = [
        str(native.tool_path("llama-bench")),
        "-m",
        str(path),
        "-p",
        str(cfg.n_prompt),
        "-n",
        str(cfg.n_gen),
    ]
    cmd += ["-r", str(cfg.repetitions), "-t", str(cfg.threads), "-ngl", str(cfg.n_gpu_layers), "-o", "json"]
    peak = [0.0]

    def sample(pid: int) -> None:
        hwm = _vm_hwm_mib(pid)
        if hwm is not None:
            peak[0] = max(peak[0], hwm)

    done = run(cmd, watch=sample, every_s=0.02)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        raise BenchError(f"{path}: llama-bench failed (exit {done.returncode}): {' / '.join(tail)}")
    return json.loads(done.stdout), peak[0]


def bench_file(path: Path, cfg: BenchConfig) -> BenchResult:
    cfg = replace(cfg, threads=cfg.threads or len(os.sched_getaffinity(0)))
    records, peak = run_llama_bench(path, cfg)
    return BenchResult(
        file=path.name,
        info=file_info(path),
        n_params=int(records[0]["model_n_params"]),
        speeds=[_speed(e) for e in records],
        peak_rss_mib=peak,
        backends=str(records[0]["backends"]),
        threads=cfg.threads,
    )


def run_cli(models: Sequence[Path], cfg: BenchConfig, as_json: bool) -> list[BenchResult]:
    from rich.console import Console
    from rich.table import Table

    try:
        native.check_gpu_layers(cfg.n_gpu_layers)
        for path in models:
            check_model_file(path, 1)
    except (native.DeviceError, GGUFFormatError, ModelFileError) as exc:
        raise BenchError(str(exc)) from exc
    results = []
    err = Console(stderr=True)
    with err.status("") as status:
        for i, path in enumerate(models):
            status.update(
                f"llama-bench {path.name} ({i + 1}/{len(models)}): pp{cfg.n_prompt}, tg{cfg.n_gen} x {cfg.repetitions}"
            )
            results.append(bench_file(path, cfg))
    if as_json:
        print(json.dumps([asdict(r) for r in results], indent=2))
        return results
    table = Table(
        title=f"llama-bench, {results[0].threads} threads, {results[0].backends}, median of {cfg.repetitions}"
    )
    for name in ("file", "type", "MiB", "bpw"):
        table.add_column(name, justify="left" if name in ("file", "type") else "right")
    tests = [s.test for s in results[0].speeds]
    for t in tests:
        table.add_column(f"{t} t/s", justify="right")
    table.add_column("peak RSS MiB", justify="right")
    for r in sorted(results, key=lambda r: r.info.size_mib, reverse=True):
        cells = [r.file, type_label(r.info), f"{r.info.size_mib:,.1f}", f"{r.info.bpw:.2f}"]
        for s in r.speeds:
            cells.append(f"{s.median:,.1f} ({s.low:,.0f}-{s.high:,.0f})")
        cells.append(f"{r.peak_rss_mib:,.0f}")
        table.add_row(*cells)
    Console().print(table)
    return results
