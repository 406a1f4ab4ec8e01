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

--budgets Q4_K_M,Q3_K_M,7.0M adds, per method, ggq's budget file (ggq convert --target-size): at
a type's name the byte size of llama.cpp's imatrix file of that type (so those types must be in
--types), else a size as --target-size takes it; their verdicts compare with llama.cpp's imatrix
file of that size and one size class up, and with ggq's own fixed recipe of that type.
--rank-plans N writes N random mixed plans (RTN, the sensitivity of --budgets' first method's
calibration) and prints the Spearman rank correlation of their predicted and measured mean KLD.
"""

from __future__ import annotations

import argparse
import math
import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

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
    for b in args.budgets.split(",") if args.budgets else ():
        size = files[b, "llama.cpp imatrix"].stat().st_size if (b, "llama.cpp imatrix") in files else b
        for method in args.budget_methods.split(","):
            out = work / f"ggq-{method}-budget-{b}.gguf"
            start = time.perf_counter()
            log = run(
                [
                    *ggq,
                    "--method",
                    method,
                    "--calib",
                    str(args.calib),
                    "--target-size",
                    str(size),
                    "-o",
                    str(out),
                ]
            )
            files[f"size {b}", f"ggq {method} budget"] = out
            line = next((x for x in log.splitlines() if x.startswith("budget ")), "")
            print(
                f"{model.name}: ggq {method} budget {b} ({size}): {time.perf_counter() - start:.0f} s; {line}",
                file=sys.stderr,
            )
    return f32, files


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def rank_plans(model: Path, args: argparse.Namespace, work: Path, base: Path) -> None:
    """Random mixed plans (RTN): predicted (sum of the sensitivity's per-tensor KLD) against the
    mean KLD llama-perplexity measures; prints the Spearman rank correlation."""
    from ggq.checkpoint import Checkpoint
    from ggq.convert import CalibOptions, ConvertOptions, convert, make_plan
    from ggq.plan import budget as bud

    ckpt = Checkpoint(model)
    opts = ConvertOptions(method="rtn", cal=CalibOptions(calib=args.calib, device="cpu"))
    f16 = sum(t.nbytes for t in make_plan(ckpt, replace(opts, recipe=replace(opts.recipe, file_type="F16"))))
    bp = bud.plan_budget(ckpt, opts, bud.BudgetRequest(size=str(int(f16 * 0.3))))
    pred_all = bp.sensitivity.predicted()
    print(
        f"\n{model.name}: sensitivity {bp.sensitivity.key} ({'cached' if bp.cached else 'measured'}): "
        + ", ".join(f"{k} {v:.2f}" for k, v in bp.sensitivity.seconds.items())
    )
    rng = random.Random(0)
    predicted, measured = [], []
    for k in range(args.rank_plans):
        level = rng.random()  # each plan its own mean precision, the tensors spread around it
        types = {}
        for t in make_plan(ckpt, opts):
            if t.name in pred_all:
                cands = [q for q in bud.candidates(t.shape) if q != "F16" and q in pred_all[t.name]]
                i = round(min(max(level * (len(cands) - 1) + rng.gauss(0, 1.5), 0), len(cands) - 1))
                types[t.name] = cands[i]
        out = work / f"rank-{k}.gguf"
        convert(ckpt, out, replace(opts, tensor_overrides=tuple(types.items())))
        predicted.append(sum(pred_all[n][q] for n, q in types.items()))
        measured.append(llama_tools.kld_stats(out, base, chunks=args.chunks)["kld"])
        print(
            f"  plan {k}: {out.stat().st_size / 2**20:.2f} MiB, predicted {predicted[-1]:.5f}, measured {measured[-1]:.5f}"
        )
        out.unlink()
    print(
        f"  Spearman rank correlation, predicted vs measured mean KLD over {len(measured)} random plans: "
        f"{spearman(predicted, measured):.3f}"
    )


def print_budget_verdicts(rows: dict[tuple[str, str], dict]) -> None:
    print(
        "\nggq budget files against llama.cpp imatrix (same size, and one size class up) and ggq's fixed recipe:"
    )
    up = {"Q3_K_M": "Q4_K_M", "Q2_K": "Q3_K_M", "Q4_K_M": "Q5_K_M"}
    for t, label in rows:
        if not label.endswith(" budget"):
            continue
        b, r = t.removeprefix("size "), rows[t, label]
        for ref_t, ref_label in (
            (b, "llama.cpp imatrix"),
            (up.get(b, ""), "llama.cpp imatrix"),
            (b, label.removesuffix(" budget")),
        ):
            ref = rows.get((ref_t, ref_label))
            if ref is None:
                continue
            print(
                f"  {label} @ {b}: mean KLD {r['kld'] / ref['kld']:.3f}x {ref_label} {ref_t} "
                f"({r['kld']:.5f} vs {ref['kld']:.5f}), 99.9% KLD {r['kld_p999'] / ref['kld_p999']:.3f}x"
            )


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
        print_budget_verdicts(rows)
        if args.rank_plans and text == texts[0]:
            llama_tools.kld_base(f32, text, base, chunks=args.chunks)
            rank_plans(model, args, work, base)
            base.unlink()


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
    ap.add_argument("--budgets", default="", help="budget files: type names (their imatrix size) or sizes")
    ap.add_argument("--budget-methods", default="gptq", help="methods of the budget files")
    ap.add_argument("--rank-plans", type=int, default=0, help="random plans for the rank correlation")
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
