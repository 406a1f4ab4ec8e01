"""Benchmark: `ggq ppl` against llama.cpp's llama-perplexity, same file, text, context and threads.

Two models, each run by both tools as their own processes, alternating, side by side in one run:

  qwen3-micro F32   (../shared/models/qwen3-micro: 10 M parameters, 16,384-token vocabulary)
  full-vocab F32    (ggq.testing's "full-vocab" fixture: a tiny model with Qwen3's 151,936-row
                     vocabulary, where the per-token log-softmax loop dominates)

on ctx 512 chunks of the held-out text. Tokens scored per second are taken over the evaluation
phase (decoding and scoring, model load and tokenization excluded): for ggq from its --json
"seconds", for llama-perplexity from its log's timestamps ("calculating perplexity" to "Final
estimate"); whole-process wall and CPU times (load and tokenization included) are printed too,
CPU time being the steadier of the two on a shared machine. Each pair is run --repeat times,
alternating, and the best time of each tool kept. Exits 1 if the two tools' PPL or its
uncertainty differ (to 4 significant digits).

Then the KL-divergence mode: `ggq ppl Q --base F32` (one pass over both models) against the sum
of the two plain runs `ggq ppl F32` and `ggq ppl Q` (target <= 1.1x: the comparison itself should
cost next to nothing), with Q the Q4_0 llama-quantize makes of each model; llama-perplexity's
two-step --kl-divergence-base + --kl-divergence is timed beside it for reference.

    .venv/bin/python tools/bench_ppl.py                  # 40 chunks, all cores
    .venv/bin/python tools/bench_ppl.py --chunks 8 --repeat 1   # a quick smoke run
    .venv/bin/python tools/bench_ppl.py --wait-idle --repeat 3  # on a machine others use too
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ggq import native

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
STAMP = r"(\d+)\.(\d+)\.(\d+)\.(\d+) I "  # llama.cpp log prefix: minutes.seconds.ms.us
START = re.compile(STAMP + r"perplexity: calculating perplexity")
FINAL = re.compile(STAMP + r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


@dataclass(frozen=True)
class Timing:
    eval_seconds: float  # decoding and scoring
    wall_seconds: float  # the whole process
    cpu_seconds: float  # the whole process, user + system
    ppl: float
    ppl_err: float


def _stamp(m: re.Match[str]) -> float:
    minutes, seconds, ms, us = (int(g) for g in m.groups()[:4])
    return minutes * 60 + seconds + ms / 1e3 + us / 1e6


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(cmd: list[str]) -> tuple[str, str, float, float]:
    """stdout, stderr, wall seconds and CPU seconds (user + system) of one process."""
    cpu0, start = _children_cpu(), time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu0
    if out.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{(out.stdout + out.stderr)[-3000:]}")
    return out.stdout, out.stderr, wall, cpu


def run_llama(gguf: Path, text: Path, n_ctx: int, chunks: int, threads: int) -> Timing:
    tool = str(native.tool_path("llama-perplexity"))
    cmd = [
        tool,
        "-m",
        str(gguf),
        "-f",
        str(text),
        "-c",
        str(n_ctx),
        "--chunks",
        str(chunks),
        "-t",
        str(threads),
    ]
    # At this pin the tool's asynchronous logger can exit with its last lines unprinted (llama.cpp
    # issue 22142): such a run is repeated.
    for _ in range(5):
        _, log, wall, cpu = _run(cmd)
        start, final = START.search(log), FINAL.search(log)
        if start and final:
            ppl, err = float(final.group(5)), float(final.group(6))
            return Timing(_stamp(final) - _stamp(start), wall, cpu, ppl, err)
    sys.exit(f"llama-perplexity printed no estimate:\n{log[-3000:]}")


def run_ggq(gguf: Path, text: Path, n_ctx: int, chunks: int, threads: int) -> Timing:
    cmd = [sys.executable, "-m", "ggq.cli", "ppl", str(gguf), "-f", str(text), "-c", str(n_ctx)]
    out, _, wall, cpu = _run([*cmd, "--chunks", str(chunks), "-t", str(threads), "--json"])
    r = json.loads(out)["rows"][0]
    return Timing(r["seconds"], wall, cpu, r["ppl"], r["ppl_err"])


def ggq_eval_seconds(cmd: list[str]) -> float:
    """Evaluation seconds of a `ggq ppl --json` run: every row's (the base's included)."""
    out, _, _, _ = _run(cmd)
    return sum(r["seconds"] for r in json.loads(out)["rows"])


def llama_kld_seconds(f32: Path, q: Path, args: argparse.Namespace, work: Path) -> float:
    """Whole-process wall seconds of llama-perplexity's two steps (base logits file, then KLD)."""
    tool = str(native.tool_path("llama-perplexity"))
    common = ["-c", str(args.ctx), "--chunks", str(args.chunks), "-t", str(args.threads)]
    kld_file = work / "base.kld"
    _, _, w1, _ = _run(
        [tool, "-m", str(f32), "-f", str(args.text), *common, "--kl-divergence-base", str(kld_file)]
    )
    _, _, w2, _ = _run(
        [tool, "-m", str(q), "--kl-divergence-base", str(kld_file), "--kl-divergence", *common]
    )
    return w1 + w2


def compare_kld(label: str, f32: Path, args: argparse.Namespace, work: Path) -> str:
    q = work / f"{f32.stem}-Q4_0.gguf"
    if not q.exists():
        _run([str(native.tool_path("llama-quantize")), str(f32), str(q), "Q4_0"])
    ppl = [sys.executable, "-m", "ggq.cli", "ppl", "-f", str(args.text), "-c", str(args.ctx)]
    ppl += ["--chunks", str(args.chunks), "-t", str(args.threads), "--json"]
    plain: list[float] = []
    kld: list[float] = []
    llama: list[float] = []
    for _ in range(args.repeat):
        if args.wait_idle:
            wait_idle()
        plain.append(ggq_eval_seconds([*ppl, str(f32)]) + ggq_eval_seconds([*ppl, str(q)]))
        if args.wait_idle:
            wait_idle()
        kld.append(ggq_eval_seconds([*ppl, str(q), "--base", str(f32)]))
        llama.append(llama_kld_seconds(f32, q, args, work))
    p, k = min(plain), min(kld)
    return f"{label:16s} {p:14.2f}s {k:12.2f}s {k / p:6.2f}x {min(llama):16.1f}s"


def build_models(work: Path) -> dict[str, Path]:
    """F32 GGUFs of qwen3-micro and the full-vocab fixture, built in a subprocess (torch stays out)."""
    code = (
        "import sys; from pathlib import Path; from ggq import testing\n"
        "from ggq.checkpoint import Checkpoint; from ggq.convert import ConvertOptions, convert\n"
        "from ggq.plan.recipe import RecipeOptions\n"
        "w = Path(sys.argv[1]); opts = ConvertOptions(recipe=RecipeOptions(file_type='F32'))\n"
        "convert(Checkpoint(Path(sys.argv[2])), w / 'qwen3-micro-f32.gguf', opts)\n"
        "fv = testing.build_checkpoint(w / 'full-vocab', 'full-vocab')\n"
        "convert(Checkpoint(fv), w / 'full-vocab-f32.gguf', opts)\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(work), str(SHARED / "models" / "qwen3-micro")], check=True
    )
    return {"qwen3-micro F32": work / "qwen3-micro-f32.gguf", "full-vocab F32": work / "full-vocab-f32.gguf"}


def _cpu_idle_fraction(seconds: float) -> float:
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, all

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(1, total1 - total0)


def wait_idle(threshold: float = 0.9, timeout: float = 900.0) -> None:
    """On a shared machine, wait until other processes leave the CPUs (mostly) idle for 3 s."""
    if not Path("/proc/stat").is_file():
        return
    deadline = time.monotonic() + timeout
    while _cpu_idle_fraction(3.0) < threshold:
        if time.monotonic() > deadline:
            print(
                f"warning: CPUs still busy after {timeout:.0f} s of waiting; timing anyway", file=sys.stderr
            )
            return


def same_4_digits(a: float, b: float) -> bool:
    return abs(a - b) <= 5e-5 * abs(b)


HEADER = (
    f"{'model':16s} {'PPL ggq':>12s} {'PPL llama':>12s} {'± ggq':>9s} {'± llama':>9s} {'tok/s ggq':>10s}"
    f" {'tok/s llama':>11s} {'ratio':>6s} {'wall ggq':>9s} {'wall llama':>10s} {'CPU ggq':>8s} {'CPU llama':>9s}"
)


def compare(label: str, gguf: Path, args: argparse.Namespace) -> tuple[str, bool]:
    """One table row (best of args.repeat, the two tools alternating) and whether the PPLs agree."""
    ours: list[Timing] = []
    ref: list[Timing] = []
    for _ in range(args.repeat):
        if args.wait_idle:
            wait_idle()
        ours.append(run_ggq(gguf, args.text, args.ctx, args.chunks, args.threads))
        if args.wait_idle:
            wait_idle()
        ref.append(run_llama(gguf, args.text, args.ctx, args.chunks, args.threads))
    o = min(ours, key=lambda t: t.eval_seconds)
    r = min(ref, key=lambda t: t.eval_seconds)
    n_scored = args.chunks * (args.ctx - 1 - args.ctx // 2)
    rate_o, rate_r = n_scored / o.eval_seconds, n_scored / r.eval_seconds
    row = (
        f"{label:16s} {o.ppl:12.4f} {r.ppl:12.4f} {o.ppl_err:9.5f} {r.ppl_err:9.5f} {rate_o:10.0f}"
        f" {rate_r:11.0f} {rate_o / rate_r:5.2f}x"
        f" {min(t.wall_seconds for t in ours):8.1f}s {min(t.wall_seconds for t in ref):9.1f}s"
        f" {min(t.cpu_seconds for t in ours):7.1f}s {min(t.cpu_seconds for t in ref):8.1f}s"
    )
    return row, same_4_digits(o.ppl, r.ppl) and same_4_digits(o.ppl_err, r.ppl_err)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--wait-idle", action="store_true", help="before each run, wait until the CPUs are >= 90%% idle"
    )
    parser.add_argument("--text", type=Path, default=SHARED / "data" / "gutenberg-heldout" / "heldout.txt")
    args = parser.parse_args()

    print(
        f"text {args.text.name}, ctx {args.ctx}, {args.chunks} chunks, {args.threads} threads, best of {args.repeat}"
    )
    agree = True
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(Path(tmp))
        print(HEADER)
        for label, gguf in models.items():
            row, same = compare(label, gguf, args)
            print(row, flush=True)
            agree &= same
        print(
            "tok/s: tokens scored per second of decoding and scoring; ratio: ggq / llama-perplexity (target >= 0.95x)"
        )
        print("wall, CPU: the whole process (load, tokenization, evaluation), best of the runs")
        print()
        print(
            f"{'KLD mode':16s} {'plain F32 + Q4_0':>15s} {'--base pass':>13s} {'ratio':>7s} {'llama two-step':>17s}"
        )
        for label, gguf in models.items():
            print(compare_kld(label, gguf, args, Path(tmp)), flush=True)
        print(
            "plain: evaluation seconds of `ggq ppl F32` + `ggq ppl Q4_0`; --base pass: of `ggq ppl Q4_0 --base F32`"
            " (target <= 1.1x); llama two-step: whole-process wall of --kl-divergence-base + --kl-divergence"
        )
    if not agree:
        print("FAILED: the two tools' PPL estimates differ", file=sys.stderr)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
