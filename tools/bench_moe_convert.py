"""Benchmark: `ggq convert --type Q4_K_M` of a Qwen3-MoE checkpoint against llama.cpp's
convert_hf_to_gguf.py + llama-quantize, on a synthetic checkpoint with Qwen3-30B-A3B's shapes.

Qwen3-30B-A3B: hidden 2048, 32 query / 4 KV heads of 128, 128 experts of which 8 are active,
moe_intermediate_size 768, 151,936-token vocabulary, untied output, 48 layers. The checkpoint
here has those shapes but only --layers layers (num_hidden_layers says so: a config with 48
layers and 2 written would be refused by both tools), random bf16 weights, one tensor per expert
as the hub ships them, streamed into ~1 GiB shards. Each tool runs as its own process, with the
same threads:

  ggq:       ggq convert CKPT --type Q4_K_M
  llama.cpp: convert_hf_to_gguf.py CKPT --outtype bf16 (lossless from bf16), then llama-quantize

and the script prints wall time and peak RSS (ru_maxrss of the child, i.e. its VmHWM at exit) of
each, the ratios, and whether the two Q4_K_M files hold the same tensors byte for byte (both
quantize the same bf16 values). Exits 1 if they differ.

    .venv/bin/python tools/bench_moe_convert.py --workdir /tmp/d          # 2 layers, ~3.7 GB
    .venv/bin/python tools/bench_moe_convert.py --layers 1 --experts 16   # a quick smoke run
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from bench_convert import (  # tools/ is sys.path[0] when run as a script
    Run,
    checkpoint_size,
    convert_bench_parser,
    convert_side_by_side,
)

BUILD = """
import sys
from ggq import testing as t
path, layers, experts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
spec = t.Qwen3MoeSpec(
    hidden_size=2048, head_dim=128, num_attention_heads=32, num_key_value_heads=4,
    intermediate_size=6144, moe_intermediate_size=768, num_experts=experts, num_experts_per_tok=8,
    num_hidden_layers=layers, vocab_size=t.QWEN3_VOCAB_ROWS, tie_word_embeddings=False,
    max_position_embeddings=40960, seed=0,
)
t.build_checkpoint(path, spec, shard_bytes=1 << 30)
"""


def same_tensors(a: Path, b: Path) -> list[str]:
    """Names of the tensors whose type or bytes differ between two GGUF files (or that one lacks)."""
    import numpy as np

    from ggq.gguf import read_gguf

    fa, fb = read_gguf(a), read_gguf(b)
    names = set(fa.tensors) | set(fb.tensors)
    return sorted(
        n
        for n in names
        if n not in fa.tensors
        or n not in fb.tensors
        or fa.tensors[n].type_id != fb.tensors[n].type_id
        or not np.array_equal(fa.tensor_data(n), fb.tensor_data(n))
    )


def main() -> int:
    parser = convert_bench_parser(__doc__, layers=2)
    parser.add_argument("--experts", type=int, default=128)
    args = parser.parse_args()

    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)  # a new folder is what --workdir usually names
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        ckpt = work / "Qwen3-MoE-Bench"
        subprocess.run(
            [sys.executable, "-c", BUILD, str(ckpt), str(args.layers), str(args.experts)], check=True
        )
        size = checkpoint_size(ckpt)
        n_shards = len(list(ckpt.glob("*.safetensors")))
        print(
            f"checkpoint: {args.layers} layers x {args.experts} experts, {size / 2**30:.2f} GiB bf16 "
            f"in {n_shards} shards, {args.threads} threads"
        )
        (ggq, hf, quant), ggq_out, ref_out = convert_side_by_side(
            ckpt, work, args.type, args.threads, outtype="bf16"
        )
        differing = same_tensors(ggq_out, ref_out)
        sizes = ggq_out.stat().st_size, ref_out.stat().st_size

    report([ggq, hf, quant], size)
    print(f"output: ggq {sizes[0] / 2**20:.1f} MiB, llama-quantize {sizes[1] / 2**20:.1f} MiB")
    if differing:
        print(f"tensors that differ from llama-quantize's: {len(differing)}: {', '.join(differing[:8])}")
        return 1
    print("every tensor equals llama-quantize's, type and bytes")
    return 0


def report(runs: list[Run], size: int) -> None:
    ggq, hf, quant = runs
    ref_time = hf.seconds + quant.seconds
    ref_rss = max(hf.peak_rss_mib, quant.peak_rss_mib)
    print(f"{'step':28s} {'seconds':>9s} {'peak RSS MiB':>13s}")
    for r in runs:
        print(f"{r.label:28s} {r.seconds:9.1f} {r.peak_rss_mib:13.0f}")
    print(f"{'llama.cpp pipeline':28s} {ref_time:9.1f} {ref_rss:13.0f}")
    print(f"time  ratio ggq / llama.cpp pipeline: {ggq.seconds / ref_time:.2f}x (issue 14 target <= 0.33)")
    print(
        f"peak RSS ggq / checkpoint size:       {ggq.peak_rss_mib * 2**20 / size:.1%} (issue 14 target <= 5%)"
    )
    print(f"peak RSS ggq / llama.cpp pipeline:    {ggq.peak_rss_mib / ref_rss:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
