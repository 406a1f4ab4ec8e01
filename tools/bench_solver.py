"""Benchmark: the calibrated solvers (gptq, awq, awq+gptq) at real Qwen3 shapes.

Writes a synthetic checkpoint with the exact shapes of a Qwen3 release (random bf16, sharded as
the hub ships it, only ``--layers`` decoder layers), then runs each method's layer-by-layer
solver on it, each in its own process (a fresh peak RSS), on seeded random calibration tokens
(``--nsamples`` x ``--seqlen``; the solver's cost does not depend on which tokens they are).
Per layer it prints the time split into forward passes, input statistics (X^T X, means), solver
loops (GPTQ's column loop and factorization, AWQ's searches and refits), ggml encode/decode
(inside and outside the loops) and error diagnostics, and the process's peak RSS (VmHWM) after
the layer; then the full model's projected time (mean seconds per layer x the release's layer
count) and which part dominates.

    .venv/bin/python tools/bench_solver.py                        # 0.6B shape, 2 layers, 16 x 512
    .venv/bin/python tools/bench_solver.py --shape 8B --nsamples 128 --methods gptq

Only the solver runs (what ``ggq convert --method ...`` spends on the layers). With
``--vs-llama-cpp`` it then times, on the same checkpoint and threads, ``ggq convert --type T``
(RTN) against llama.cpp's convert_hf_to_gguf.py (bf16) + llama-quantize (tools/bench_convert.py's
convert_side_by_side), prints them side by side with their peak RSS, and says whether the two
files hold the same tensors byte for byte (exit 1 if not):

    .venv/bin/python tools/bench_solver.py --shape 8B --layers 1 --methods gptq --vs-llama-cpp

Without ``--legacy`` each method runs with the solver's defaults. ``--legacy`` runs each method
twice instead, one after the other in the same run, on the same checkpoint and threads: first
with ``SolverOptions.legacy_gptq=True``, ``diag_rows=0`` and ``search_rows=0`` (the GPTQ
statistics, three factorizations per linear, the error diagnostics and AWQ's candidate scores on
every row, as before issue 13's part 3), then with the defaults (one factorization shared by the
linears reading one input, float32 chunk products, diagnostics and AWQ's scores on a row sample),
and prints how many times faster per layer the second ("now") is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# children run as this one does (python -S with PYTHONPATH: another tree's ggq, side by side)
PYTHON = [sys.executable, *(["-S"] if sys.flags.no_site else [])]
PARTS = ("load", "forward", "stats", "solve", "encode", "diag")  # ggq.solvers.options.PARTS (no torch here)


@dataclass(frozen=True)
class Shape:
    """A Qwen3 release's shapes (its config.json)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    tied: bool
    head_dim: int = 128


SHAPES = {
    "0.6B": Shape(1024, 28, 16, 8, 3072, tied=True),
    "4B": Shape(2560, 36, 32, 8, 9728, tied=True),
    "8B": Shape(4096, 36, 32, 8, 12288, tied=False),
    "14B": Shape(5120, 40, 40, 8, 17408, tied=False),
    "32B": Shape(5120, 64, 64, 8, 25600, tied=False),
}

BUILD = """
import sys
from ggq import testing as t
path, hidden, heads, kv, ffn, tied, layers, vocab = sys.argv[1:]
spec = t.Qwen3Spec(
    hidden_size=int(hidden), head_dim=128, num_attention_heads=int(heads),
    num_key_value_heads=int(kv), intermediate_size=int(ffn), num_hidden_layers=int(layers),
    vocab_size=int(vocab), tie_word_embeddings=tied == "1", max_position_embeddings=40960, seed=0,
)
t.build_checkpoint(path, spec, shard_bytes=5 << 30 if int(hidden) > 2048 else 1 << 30)
"""


def vm_hwm_mib() -> float:
    """This process's peak resident set (VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(
    ckpt_path: Path, method: str, type_name: str, nsamples: int, seqlen: int, device: str, gptq_path: str
) -> None:
    """Run one method's solver over every layer, one JSON line per layer on stdout; ``gptq_path``:
    "default" (SolverOptions' own), "legacy" or "new" (legacy_gptq True / False)."""
    import numpy as np

    from ggq.checkpoint import Checkpoint
    from ggq.convert import ConvertOptions, make_plan
    from ggq.plan import recipe as rc
    from ggq.solvers import layerwise
    from ggq.solvers.options import HEAD, LayerReport, SolverOptions, resolve_device

    ckpt = Checkpoint(ckpt_path)
    types = {t.name: t.type for t in make_plan(ckpt, ConvertOptions(rc.RecipeOptions(type_name)))}
    tokens = np.random.default_rng(0).integers(0, ckpt.hparams.n_vocab, (nsamples, seqlen))
    opts = SolverOptions(method=method, device=resolve_device(device))
    if gptq_path == "legacy":  # the code before issue 13's part 3: diagnostics and AWQ scores on every row
        opts = replace(opts, legacy_gptq=True, diag_rows=0, search_rows=0, solve_head=False)
    elif gptq_path == "new":
        opts = replace(opts, legacy_gptq=False)

    def report(rep: LayerReport) -> None:
        line = {"layer": rep.layer, "seconds": rep.seconds, "times": rep.times, "peak_rss_mib": vm_hwm_mib()}
        print(json.dumps(line), flush=True)

    last = time.perf_counter()
    for i, _ in layerwise.solve_layers(ckpt, tokens, types, opts, report):
        if i == HEAD:  # solved after the last layer's yield: the time since is the head's
            print(json.dumps({"head": time.perf_counter() - last, "peak_rss_mib": vm_hwm_mib()}), flush=True)
        last = time.perf_counter()


def run_method(
    ckpt: Path, method: str, args: argparse.Namespace, gptq_path: str = "default"
) -> list[dict[str, Any]]:
    cmd = [*PYTHON, __file__, "--child", str(ckpt), "--methods", method, "--type", args.type]
    cmd += ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", args.device]
    cmd += ["--gptq-path", gptq_path]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{method} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def table(method: str, layers: list[dict[str, Any]], shape: Shape) -> dict[str, Any]:
    """Print one method's per-layer table and projection; return its summary."""
    print(f"\n{method}")
    cols = (*PARTS, "other")
    print(f"{'layer':>5s} {'seconds':>8s} " + " ".join(f"{p:>8s}" for p in cols) + f" {'peak MiB':>9s}")
    totals = dict.fromkeys(cols, 0.0)
    head = [r for r in layers if "head" in r]  # the output head, solved after the last layer
    layers = [r for r in layers if "layer" in r]
    for rec in layers:
        times = dict(rec["times"])
        seconds = float(rec["seconds"])
        times["other"] = seconds - sum(times.values())  # outside every timed part
        for p in cols:
            totals[p] += float(times.get(p, 0.0))
        cells = " ".join(f"{float(times.get(p, 0.0)):8.1f}" for p in cols)
        print(f"{rec['layer']:5d} {seconds:8.1f} {cells} {float(rec['peak_rss_mib']):9.0f}")
    per_layer = sum(float(r["seconds"]) for r in layers) / len(layers)
    dominant = max(cols, key=lambda p: totals[p])
    share = totals[dominant] / max(sum(totals.values()), 1e-9)
    head_s = float(head[0]["head"]) if head else 0.0
    projected = per_layer * shape.layers + head_s
    peak = max(float(r["peak_rss_mib"]) for r in layers + head)
    if head:
        print(f" head {head_s:8.1f} (output head after the last layer) {float(head[0]['peak_rss_mib']):9.0f}")
    print(
        f"mean {per_layer:.1f} s/layer -> projected {shape.layers} layers + head: {projected / 60:.1f} min; "
        f"dominant part: {dominant} ({share:.0%}); peak RSS {peak:.0f} MiB"
    )
    return {
        "method": method,
        "layers": layers,
        "seconds_per_layer": per_layer,
        "projected_seconds": projected,
        "head_seconds": head_s,
        "dominant": dominant,
        "peak_rss_mib": peak,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.6B")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--methods", default="gptq,awq,awq+gptq")
    parser.add_argument("--type", default="Q4_K_M")
    parser.add_argument("--vocab", type=int, default=151936, help="embedding rows (default Qwen3's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--checkpoint", type=Path, help="reuse (or keep) the checkpoint here")
    parser.add_argument("--workdir", type=Path, help="where the temporary checkpoint goes")
    parser.add_argument("--json", type=Path, help="write the per-layer records here")
    parser.add_argument(
        "--vs-llama-cpp",
        action="store_true",
        help="also RTN ggq convert vs llama.cpp's convert_hf_to_gguf.py + llama-quantize on the checkpoint",
    )
    parser.add_argument(
        "--legacy",
        action="store_true",
        help="run each method as the code was before issue 13 part 3, then with the defaults, and compare",
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--gptq-path", choices=("default", "legacy", "new"), default="default", help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child(args.child, args.methods, args.type, args.nsamples, args.seqlen, args.device, args.gptq_path)
        return 0

    shape = SHAPES[args.shape]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        ckpt = args.checkpoint or Path(tmp) / f"Qwen3-{args.shape}-bench"
        if not (ckpt / "config.json").exists():
            sizes = (shape.hidden, shape.heads, shape.kv_heads, shape.ffn, int(shape.tied))
            build = [*PYTHON, "-c", BUILD, str(ckpt), *map(str, sizes), str(args.layers), str(args.vocab)]
            subprocess.run(build, check=True)
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        print(
            f"Qwen3-{args.shape} shapes, {args.layers} of {shape.layers} layers, {size / 2**30:.2f} GiB bf16; "
            f"{args.nsamples} x {args.seqlen} calibration tokens, {args.type}, {args.device}, "
            f"{args.threads} threads"
        )
        results = []
        for m in (m for m in args.methods.split(",") if m):
            if not args.legacy:
                results.append(table(m, run_method(ckpt, m, args), shape))
                continue
            results.append(table(f"{m} (legacy)", run_method(ckpt, m, args, "legacy"), shape))
            results.append(table(f"{m} (now)", run_method(ckpt, m, args, "new"), shape))
            old, new = results[-2]["seconds_per_layer"], results[-1]["seconds_per_layer"]
            print(f"{m}: {old:.1f} s/layer legacy, {new:.1f} s/layer now: {old / new:.2f}x faster")
        rtn = rtn_vs_llama_cpp(ckpt, Path(tmp), args.type, args.threads, size) if args.vs_llama_cpp else None
    if args.json:
        doc = {"args": vars(args) | {"checkpoint": str(ckpt)}, "runs": results, "rtn_vs_llama_cpp": rtn}
        args.json.write_text(json.dumps(doc, default=str))
    return 1 if rtn is not None and rtn["differing"] else 0


def rtn_vs_llama_cpp(ckpt: Path, work: Path, type_name: str, threads: int, size: int) -> dict[str, Any]:
    """RTN ``ggq convert`` against llama.cpp's convert + quantize of ``ckpt``, side by side."""
    from bench_convert import convert_side_by_side  # tools/ is sys.path[0] when run as a script
    from bench_moe_convert import same_tensors

    (ggq, hf, quant), ggq_out, ref_out = convert_side_by_side(ckpt, work, type_name, threads, "bf16")
    differing = same_tensors(ggq_out, ref_out)
    ref_seconds, ref_peak = hf.seconds + quant.seconds, max(hf.peak_rss_mib, quant.peak_rss_mib)
    print(
        f"\nRTN {type_name}, {threads} threads: ggq convert vs llama.cpp's convert_hf_to_gguf (bf16) + llama-quantize"
    )
    print(f"{'step':28s} {'seconds':>9s} {'peak RSS MiB':>13s} {'% of ckpt':>10s}")
    for label, sec, peak in (
        *((r.label, r.seconds, r.peak_rss_mib) for r in (ggq, hf, quant)),
        ("llama.cpp pipeline", ref_seconds, ref_peak),
    ):
        print(f"{label:28s} {sec:9.1f} {peak:13.0f} {peak * 2**20 / size:10.1%}")
    same = "every tensor equal, type and bytes" if not differing else f"{len(differing)} tensors differ"
    print(
        f"ggq / llama.cpp: time {ggq.seconds / ref_seconds:.2f}x, peak RSS {ggq.peak_rss_mib / ref_peak:.2f}x; {same}"
    )
    return {
        "ggq": vars(ggq),
        "convert_hf_to_gguf": vars(hf),
        "llama_quantize": vars(quant),
        "differing": differing,
    }


if __name__ == "__main__":
    sys.exit(main())
