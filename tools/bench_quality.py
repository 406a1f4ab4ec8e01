"""Quality benchmark: ggq's quants against llama.cpp's own, judged by llama.cpp's llama-perplexity.

For each type, side by side in one run, on the same F32 GGUF (written by ggq) and text:
  llama.cpp RTN       llama-quantize F32 -> TYPE
  llama.cpp imatrix   llama-imatrix on the calibration text, then llama-quantize --imatrix
  ggq METHOD          ggq convert --method METHOD --type TYPE (--methods, default rtn,gptq)
and prints file size, PPL ±, ΔPPL (against the plain F32 PPL), mean KLD ± against F32, the
99.9 % KLD and same-top-1 ±, all from llama-perplexity's own output, as a markdown table per text
(--text may be given more than once), for each model (--model may be given more than once: each
gets its own F32, imatrix and quants under --workdir/<model name>). A ggq file counts as better
than llama.cpp's imatrix quant only when its mean KLD is lower by more than three times the two
±s combined, its same-top-1 is higher and its 99.9 % KLD is lower. Defaults need nothing outside
the repository: the embedded model, the shipped calibration text and the shipped held-out sample
(the full held-out text is in ../shared).

    .venv/bin/python tools/bench_quality.py --types Q4_0,Q4_K_M,Q3_K_M,Q2_K --chunks 232 \
        --model models/qwen3-micro --model models/qwen3-micro-b \
        --methods rtn,gptq,awq,awq+gptq --text ../shared/data/gutenberg-heldout/heldout.txt \
        --text ../shared/data/wikitext-2-raw/wiki.test.raw
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

from ggq import native
from ggq.eval import llama_tools

ROOT = Path(__file__).resolve().parent.parent
CALIB = ROOT / "ggq" / "data" / "calibration" / "gutenberg-train-sample.txt"
HELDOUT = ROOT / "models" / "qwen3-micro" / "heldout-sample.txt"


def run(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{(out.stdout + out.stderr)[-3000:]}")
    return out.stdout + out.stderr


def print_table(
    files: dict[tuple[str, str], Path], rows: dict[tuple[str, str], dict], f32_ppl: float
) -> None:
    print("| type | quant | MiB | PPL | ΔPPL | mean KLD | 99.9% KLD | same top-1 |")
    print("|---|---|---|---|---|---|---|---|")
    for (t, label), r in rows.items():
        mib = files[t, label].stat().st_size / 2**20
        print(
            f"| {t} | {label} | {mib:.2f} | {r['ppl']:.3f} ± {r['ppl_err']:.3f} | {r['ppl'] - f32_ppl:+.3f} "
            f"| {r['kld']:.5f} ± {r['kld_err']:.5f} | {r['kld_p999']:.4f} "
            f"| {100 * r['same_top']:.2f} ± {100 * r['same_top_err']:.2f}% |"
        )


def print_verdicts(rows: dict[tuple[str, str], dict]) -> None:
    print(
        "\nggq against llama.cpp imatrix of the same type (KLD ratio, same-top-1 and 99.9% KLD differences):"
    )
    for t, label in rows:
        if not label.startswith("ggq ") or (t, "llama.cpp imatrix") not in rows:
            continue
        r, ri = rows[t, label], rows[t, "llama.cpp imatrix"]
        margin, spread = ri["kld"] - r["kld"], math.hypot(ri["kld_err"], r["kld_err"])
        top = 100 * (r["same_top"] - ri["same_top"])
        tail = r["kld_p999"] / ri["kld_p999"]
        better = margin > 3 * spread and top > 0 and tail < 1
        print(
            f"  {t} {label}: KLD {r['kld'] / ri['kld']:.3f}x (margin {margin / spread:+.1f} ±), "
            f"top-1 {top:+.2f} points, 99.9% KLD {tail:.3f}x ({'better' if better else 'NOT better'})"
        )
    q4 = [r["kld"] for (t, label), r in rows.items() if t == "Q4_0" and label.startswith("ggq ")]
    if q4 and ("Q4_0", "llama.cpp RTN") in rows:
        print(
            f"  Q4_0 best ggq KLD / llama.cpp RTN Q4_0: {min(q4) / rows['Q4_0', 'llama.cpp RTN']['kld']:.3f}x"
        )


def quantize_all(
    model: Path, args: argparse.Namespace, work: Path
) -> tuple[Path, dict[tuple[str, str], Path]]:
    """ggq's F32 of ``model``, llama.cpp's imatrix of it, and every quant of the table under ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    ggq = [sys.executable, "-m", "ggq.cli", "convert", str(model), "--force"]
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
            print(f"{model.name}: ggq {method} {t}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return f32, files


def judge(model: Path, args: argparse.Namespace, texts: list[Path], work: Path) -> None:
    f32, files = quantize_all(model, args, work)
    for text in texts:
        # ΔPPL against the plain F32 PPL: --kl-divergence's "Mean PPL(base)" reads low (16-bit logits)
        base = work / "f32.kld"
        f32_ppl, _ = llama_tools.ppl(f32, text, chunks=args.chunks, kl_divergence_base=base)
        rows = {key: llama_tools.kld_stats(path, base, chunks=args.chunks) for key, path in files.items()}
        base.unlink()
        print(
            f"\n{model.name}, {text.name}, {args.chunks} chunks of 512, F32 PPL {f32_ppl:.3f} "
            f"(llama-perplexity --kl-divergence against ggq's F32 GGUF; calibration {args.calib.name})\n"
        )
        print_table(files, rows, f32_ppl)
        print_verdicts(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", type=Path, action="append", help="checkpoint (repeatable; default: models/qwen3-micro)"
    )
    ap.add_argument("--calib", type=Path, default=CALIB)
    ap.add_argument("--text", type=Path, action="append", help="judged text (repeatable; default: held-out)")
    ap.add_argument("--types", default="Q4_0,Q4_K_M,Q3_K_M,Q2_K")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--chunks", type=int, default=232)
    ap.add_argument("--workdir", type=Path, default=ROOT / "out" / "bench_quality")
    args = ap.parse_args()
    models: list[Path] = args.model or [ROOT / "models" / "qwen3-micro"]
    names = [m.resolve().name for m in models]
    if len(set(names)) != len(names):
        sys.exit(f"--model: two models named {max(names, key=names.count)!r}; each needs its own folder name")
    for model, name in zip(models, names, strict=True):
        judge(model, args, args.text or [HELDOUT], args.workdir / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
