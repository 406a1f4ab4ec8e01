"""Quality benchmark: ggq's quants against llama.cpp's own, judged by llama.cpp's llama-perplexity.

For each type, side by side in one run, on the same F32 GGUF (written by ggq) and text:
  llama.cpp RTN       llama-quantize F32 -> TYPE
  llama.cpp imatrix   llama-imatrix on the calibration text, then llama-quantize --imatrix
  ggq METHOD          ggq convert --method METHOD --type TYPE (--methods, default rtn,gptq)
and prints file size, PPL, ΔPPL, mean KLD against F32 and same-top-1, from llama-perplexity's
--kl-divergence output, as a markdown table per text (--text may be given more than once).

    .venv/bin/python tools/bench_quality.py --types Q4_0,Q4_K_M,Q3_K_M,Q2_K --chunks 232 \
        --methods rtn,gptq,awq,awq+gptq --text ../shared/data/gutenberg-heldout/heldout.txt \
        --text ../shared/data/wikitext-2-raw/wiki.test.raw
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
    ap.add_argument("--text", type=Path, action="append", help="judged text (repeatable; default: held-out)")
    ap.add_argument("--types", default="Q4_0,Q4_K_M,Q3_K_M,Q2_K")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--chunks", type=int, default=232)
    ap.add_argument("--workdir", type=Path, default=ROOT / "out" / "bench_quality")
    args = ap.parse_args()
    texts: list[Path] = args.text or [SHARED / "data" / "gutenberg-heldout" / "heldout.txt"]
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    ggq = [sys.executable, "-m", "ggq.cli", "convert", str(args.model), "--force"]
    f32 = work / "F32.gguf"
    run([*ggq, "--type", "F32", "-o", str(f32)])
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
    files: dict[tuple[str, str], Path] = {}
    for t in args.types.split(","):
        files[t, "llama.cpp RTN"] = work / f"lq-{t}.gguf"
        run([str(native.tool_path("llama-quantize")), str(f32), str(files[t, "llama.cpp RTN"]), t, "2"])
        files[t, "llama.cpp imatrix"] = work / f"lqi-{t}.gguf"
        run(
            [
                str(native.tool_path("llama-quantize")),
                "--imatrix",
                str(imatrix),
                str(f32),
                str(files[t, "llama.cpp imatrix"]),
                t,
                "2",
            ]
        )
        for method in args.methods.split(","):
            files[t, f"ggq {method}"] = work / f"ggq-{method}-{t}.gguf"
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
                    str(files[t, f"ggq {method}"]),
                ]
            )
            print(f"ggq {method} {t}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    for text in texts:
        # ΔPPL against the plain F32 PPL: --kl-divergence's "Mean PPL(base)" reads low (16-bit logits)
        base = work / "f32.kld"
        f32_ppl, _ = llama_tools.ppl(f32, text, chunks=args.chunks, kl_divergence_base=base)
        rows = []
        for (t, label), path in files.items():
            r = llama_tools.kld(path, base, chunks=args.chunks)
            rows.append(
                (
                    t,
                    label,
                    path.stat().st_size / 2**20,
                    r["ppl"],
                    r["ppl"] - f32_ppl,
                    r["kld"],
                    r["top1"],
                )
            )
        (work / "f32.kld").unlink()
        print(
            f"\n{args.model.name}, {text.name}, {args.chunks} chunks of 512, F32 PPL {f32_ppl:.3f} "
            f"(llama-perplexity --kl-divergence against ggq's F32 GGUF; calibration {args.calib.name})\n"
        )
        print("| type | quant | MiB | PPL | ΔPPL | mean KLD | same top-1 |")
        print("|---|---|---|---|---|---|---|")
        for t, label, mib, ppl, dppl, k, top in rows:
            print(f"| {t} | {label} | {mib:.2f} | {ppl:.3f} | {dppl:+.3f} | {k:.5f} | {top:.2f}% |")
        by = {(t, label): (k, top) for t, label, _, _, _, k, top in rows}
        print("\nggq against llama.cpp imatrix of the same type (KLD ratio, same-top-1 difference):")
        for t, label in files:
            if label.startswith("ggq ") and (t, "llama.cpp imatrix") in by:
                (k, top), (ki, topi) = by[t, label], by[t, "llama.cpp imatrix"]
                verdict = "better" if k < ki and top > topi else "NOT better"
                print(f"  {t} {label}: KLD {k / ki:.3f}x, top-1 {top - topi:+.2f} points ({verdict})")
        q4 = [k for (t, label), (k, _) in by.items() if t == "Q4_0" and label.startswith("ggq ")]
        if q4 and ("Q4_0", "llama.cpp RTN") in by:
            ratio = min(q4) / by["Q4_0", "llama.cpp RTN"][0]
            print(f"  Q4_0 best ggq KLD / llama.cpp RTN Q4_0: {ratio:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
