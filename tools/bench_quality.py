"""Quality benchmark: ggq's quants against llama.cpp's own, judged by llama.cpp's llama-perplexity.

For each type, side by side in one run, on the same F32 GGUF (written by ggq) and text:
  llama.cpp RTN       llama-quantize F32 -> TYPE
  llama.cpp imatrix   llama-imatrix on the calibration text, then llama-quantize --imatrix
  ggq rtn / ggq gptq  ggq convert --method rtn|gptq --type TYPE
and prints file size, PPL, ΔPPL, mean KLD against F32 and same-top-1, from llama-perplexity's
--kl-divergence output, as a markdown table.

    .venv/bin/python tools/bench_quality.py --types Q4_0,Q4_K_M,Q3_K_M,Q2_K --chunks 232
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from ggq import native
from ggq.eval import llama_tools

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


def run(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{(out.stdout + out.stderr)[-3000:]}")
    return out.stdout + out.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "qwen3-micro")
    ap.add_argument(
        "--calib", type=Path, default=SHARED / "data" / "calibration" / "gutenberg-train-sample.txt"
    )
    ap.add_argument("--text", type=Path, default=SHARED / "data" / "gutenberg-heldout" / "heldout.txt")
    ap.add_argument("--types", default="Q4_0,Q4_K_M,Q3_K_M,Q2_K")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--chunks", type=int, default=232)
    ap.add_argument("--workdir", type=Path, default=ROOT / "out" / "bench_quality")
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    ggq = [sys.executable, "-m", "ggq.cli", "convert", str(args.model), "--force"]
    f32 = work / "F32.gguf"
    run([*ggq, "--type", "F32", "-o", str(f32)])
    base = llama_tools.kld_base(f32, args.text, work / "f32.kld", chunks=args.chunks)
    imatrix = work / "imatrix.gguf"
    run(
        [
            str(native.tool_path("llama-imatrix")),
            "-m",
            str(f32),
            "-f",
            str(args.calib),
            "-o",
            str(imatrix),
            "-c",
            "512",
            "--chunks",
            "100",
            "-t",
            "2",
        ]
    )
    rows = []
    for t in args.types.split(","):
        files = {}
        files["llama.cpp RTN"] = work / f"lq-{t}.gguf"
        run([str(native.tool_path("llama-quantize")), str(f32), str(files["llama.cpp RTN"]), t, "2"])
        files["llama.cpp imatrix"] = work / f"lqi-{t}.gguf"
        run(
            [
                str(native.tool_path("llama-quantize")),
                "--imatrix",
                str(imatrix),
                str(f32),
                str(files["llama.cpp imatrix"]),
                t,
                "2",
            ]
        )
        for method in args.methods.split(","):
            files[f"ggq {method}"] = work / f"ggq-{method}-{t}.gguf"
            start = time.perf_counter()
            run(
                [
                    *ggq,
                    "--type",
                    t,
                    "--method",
                    method,
                    "--calib",
                    str(args.calib),
                    "-o",
                    str(files[f"ggq {method}"]),
                ]
            )
            print(f"ggq {method} {t}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
        for label, path in files.items():
            r = llama_tools.kld(path, base, chunks=args.chunks)
            rows.append(
                (
                    t,
                    label,
                    path.stat().st_size / 2**20,
                    r["ppl"],
                    r["ppl"] - r["ppl_base"],
                    r["kld"],
                    r["top1"],
                )
            )
    print(
        f"qwen3-micro, held-out text {args.text.name}, {args.chunks} chunks of 512, F32 PPL {r['ppl_base']:.3f} "
        f"(llama-perplexity --kl-divergence against ggq's F32 GGUF)\n"
    )
    print("| type | quant | MiB | PPL | ΔPPL | mean KLD | same top-1 |")
    print("|---|---|---|---|---|---|---|")
    for t, label, mib, ppl, dppl, k, top in rows:
        print(f"| {t} | {label} | {mib:.2f} | {ppl:.3f} | {dppl:+.3f} | {k:.5f} | {top:.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
