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
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ggq import native

ROOT = Path(__file__).resolve().parent.parent


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


def checkpoint_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--type", default="Q4_K_M")
    parser.add_argument("--workdir", type=Path, help="keep files here (default: a temporary directory)")
    args = parser.parse_args()

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

        ggq_out = work / "ggq.gguf"
        ggq = measure(
            "ggq convert",
            [sys.executable, "-m", "ggq.cli", "convert", str(ckpt), "--type", args.type, "-o", str(ggq_out)],
            args.threads,
        )
        f16 = work / "ref-f16.gguf"
        script = ROOT / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
        hf = measure(
            "convert_hf_to_gguf f16",
            [sys.executable, str(script), str(ckpt), "--outtype", "f16", "--outfile", str(f16)],
            args.threads,
        )
        quant = measure(
            "llama-quantize",
            [
                str(native.tool_path("llama-quantize")),
                str(f16),
                str(work / "ref.gguf"),
                args.type,
                str(args.threads),
            ],
            args.threads,
        )

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
