"""Benchmark: `ggq convert --type Q4_K_M` against llama.cpp's convert_hf_to_gguf.py + llama-quantize.

Builds a synthetic sharded Qwen3 checkpoint (bf16, full 151,936-token vocabulary so that
llama.cpp's converter recognises the tokenizer), then runs, each as its own process and side by
side in one run with the same threads:

  ggq:       ggq convert CKPT --type Q4_K_M
  llama.cpp: convert_hf_to_gguf.py CKPT --outtype f16, then llama-quantize F16 -> Q4_K_M

and prints wall time and peak RSS of each, and the ratios. Peak RSS is the child's ru_maxrss
(os.wait4). Linux carries a process's RSS high-water mark across fork and exec, so this parent
stays small (the checkpoint is built in a subprocess, torch is never imported here).

    .venv/bin/python tools/bench_convert.py                 # ~1.8 GB checkpoint
    .venv/bin/python tools/bench_convert.py --layers 2 --hidden 512   # a quick smoke run

``--encoders`` instead times the two C encoders of one real-size tensor (12288 rows of 4096, the
shape of Qwen3-8B's ffn_gate/ffn_up) on one thread each: ggml's own ``ggml_quantize_chunk``
(libggml-base of the native build, through ctypes, as the tests call it) and ggq's ``_quants``.
Both get the same rows in one call, with and without an importance matrix; the bytes must be
equal (exit 1 otherwise), and the time is the calling thread's CPU time (the best of
``--repeat``), so other processes on the machine slow neither side:

    .venv/bin/python tools/bench_convert.py --encoders --types Q4_K,Q6_K,Q4_0,IQ4_XS
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ggq import native

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.ggml_ref: ggml's quantizer through ctypes, the tests' reference


@dataclass(frozen=True)
class Run:
    label: str
    seconds: float
    peak_rss_mib: float


def measure(label: str, cmd: list[str], threads: int) -> Run:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{label} failed:\n{err.decode(errors='replace')[-3000:]}")
    return Run(label, seconds, usage.ru_maxrss / 1024)


def _cpu_seconds(fn: Callable[[], np.ndarray], repeat: int) -> tuple[float, np.ndarray]:
    """The best CPU time of this thread over ``repeat`` calls, and the last result."""
    best, out = float("inf"), np.empty(0, np.uint8)
    for _ in range(repeat):
        start = time.thread_time()
        out = fn()
        best = min(best, time.thread_time() - start)
    return best, out


def bench_encoders(types: list[str], n_rows: int, n_per_row: int, repeat: int) -> int:
    from ggq import _quants, ggml
    from tests import ggml_ref

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((n_rows, n_per_row), dtype=np.float32) * 0.02  # weight-like scale
    rows[rng.random(rows.shape) < 1e-3] *= 8  # a few outliers, as trained weights have
    imatrix = (rng.standard_normal(n_per_row, dtype=np.float32) ** 2 + 0.1).astype(np.float32)
    print(f"{n_rows} x {n_per_row} float32, one thread per encoder, best CPU time of {repeat}")
    print(f"{'type':8s} {'imatrix':8s} {'ggml s':>8s} {'_quants s':>10s} {'ggml/_quants':>13s}  bytes")
    same = True
    for name in types:
        type_id = ggml.ggml_type(name).type_id
        for imat in (None, imatrix):
            t_ggml, ref = _cpu_seconds(lambda: ggml_ref.quantize(rows, type_id, imat), repeat)  # noqa: B023
            t_ours, ours = _cpu_seconds(lambda: _quants.quantize(name, rows, imat, 1), repeat)  # noqa: B023
            equal = bool(np.array_equal(ref, ours))
            same &= equal
            label = "no" if imat is None else "yes"
            verdict = "equal" if equal else "DIFFER"
            print(f"{name:8s} {label:8s} {t_ggml:8.3f} {t_ours:10.3f} {t_ggml / t_ours:12.2f}x  {verdict}")
    return 0 if same else 1


def convert_side_by_side(
    ckpt: Path, work: Path, file_type: str, threads: int, outtype: str
) -> tuple[tuple[Run, Run, Run], Path, Path]:
    """``ggq convert CKPT --type T`` against convert_hf_to_gguf.py ``--outtype`` + llama-quantize,
    each its own process with the same threads: the three runs, ggq's file and llama.cpp's."""
    ggq_out, mid, ref_out = work / "ggq.gguf", work / f"ref-{outtype}.gguf", work / "ref.gguf"
    cmd = [sys.executable, "-m", "ggq.cli", "convert", str(ckpt), "--type", file_type, "-o", str(ggq_out)]
    ggq = measure("ggq convert", [*cmd, "-t", str(threads)], threads)
    script = ROOT / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    hf_cmd = [sys.executable, str(script), str(ckpt), "--outtype", outtype, "--outfile", str(mid)]
    hf = measure(f"convert_hf_to_gguf {outtype}", hf_cmd, threads)
    tool = str(native.tool_path("llama-quantize"))
    quant = measure("llama-quantize", [tool, str(mid), str(ref_out), file_type, str(threads)], threads)
    return (ggq, hf, quant), ggq_out, ref_out


def checkpoint_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def convert_bench_parser(doc: str | None, layers: int) -> argparse.ArgumentParser:
    """The options of a convert benchmark on a synthetic checkpoint (this one, bench_moe_convert):
    its layers, the threads both tools get, the file type, and where the temporary folder goes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--type", default="Q4_K_M")
    parser.add_argument("--workdir", type=Path, help="where the temporary folder goes (removed at the end)")
    return parser


def main() -> int:
    parser = convert_bench_parser(__doc__, layers=12)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument(
        "--encoders", action="store_true", help="time ggml_quantize_chunk against ggq._quants"
    )
    parser.add_argument("--types", default="Q4_K,Q6_K,Q4_0,IQ4_XS", help="with --encoders: ggml types")
    parser.add_argument("--rows", type=int, default=12288, help="with --encoders: rows of the tensor")
    parser.add_argument("--cols", type=int, default=4096, help="with --encoders: values per row")
    parser.add_argument(
        "--repeat", type=int, default=3, help="with --encoders: timings per encoder (best kept)"
    )
    args = parser.parse_args()
    if args.encoders:
        return bench_encoders(args.types.split(","), args.rows, args.cols, args.repeat)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        ckpt = work / "Qwen3-Bench"
        build = (
            "import sys; from ggq import testing as t; "
            "h, n = int(sys.argv[2]), int(sys.argv[3]); "
            "t.build_checkpoint(sys.argv[1], t.Qwen3Spec(hidden_size=h, head_dim=128, num_attention_heads=h // 128, "
            "num_key_value_heads=max(1, h // 256), intermediate_size=3 * h, num_hidden_layers=n, "
            "vocab_size=t.QWEN3_VOCAB_ROWS, shards=4, seed=0))"
        )
        subprocess.run(
            [sys.executable, "-c", build, str(ckpt), str(args.hidden), str(args.layers)], check=True
        )
        size = checkpoint_size(ckpt)
        print(f"checkpoint: {ckpt.name}, {size / 2**30:.2f} GiB bf16 in 4 shards, {args.threads} threads")

        ggq, hf, quant = convert_side_by_side(ckpt, work, args.type, args.threads, outtype="f16")[0]

    ref_time = hf.seconds + quant.seconds
    ref_rss = max(hf.peak_rss_mib, quant.peak_rss_mib)
    print(f"{'step':28s} {'seconds':>9s} {'peak RSS MiB':>13s}")
    for r in (ggq, hf, quant):
        print(f"{r.label:28s} {r.seconds:9.1f} {r.peak_rss_mib:13.0f}")
    print(f"{'llama.cpp pipeline':28s} {ref_time:9.1f} {ref_rss:13.0f}")
    print(f"time  ratio ggq / llama.cpp pipeline: {ggq.seconds / ref_time:.2f}x (target <= 1.0)")
    print(f"peak RSS ggq / checkpoint size:       {ggq.peak_rss_mib * 2**20 / size:.1%} (target <= 25%)")
    print(f"peak RSS ggq / llama.cpp pipeline:    {ggq.peak_rss_mib / ref_rss:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
