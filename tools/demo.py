"""`make demo`: the main job on the embedded default model (models/qwen3-micro).

1. `ggq convert` writes the F32 and the Q4_K_M GGUF of qwen3-micro (RTN, ggq's own encoders);
2. llama.cpp's own `llama-quantize` makes its Q4_K_M from ggq's F32 file, the baseline;
3. llama.cpp's `llama-perplexity` scores both against F32 (KL-divergence) on held-out text;
4. llama.cpp (through llama-cpp-python, the same build) continues a prompt with ggq's file.

Until the GPTQ/AWQ solvers land, ggq's RTN file is byte-identical to llama.cpp's; the demo
shows and checks that.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner
from rich.console import Console
from rich.table import Table

from ggq import native
from ggq.cli import main as ggq_main
from ggq.eval import llama_tools

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "qwen3-micro"
TEXT = MODEL / "heldout-sample.txt"
OUT = ROOT / "out" / "demo"


def ggq(console: Console, *args: str) -> None:
    console.print(f"[bold]$ ggq {' '.join(args)}[/bold]")
    result = CliRunner().invoke(ggq_main, list(args))
    console.print(result.output, end="")
    if result.exit_code != 0:
        raise SystemExit(result.exit_code)


def kld_vs_f32(f32: Path, quant: Path) -> dict[str, float]:
    """llama-perplexity's own PPL and KL-divergence of ``quant`` against ``f32``."""
    base = OUT / "f32.kld"
    if not base.exists():
        llama_tools.kld_base(f32, TEXT, base, chunks=16)
    return llama_tools.kld(quant, base, chunks=16)


def main() -> int:
    console = Console()
    OUT.mkdir(parents=True, exist_ok=True)
    f32 = OUT / "qwen3-micro-F32.gguf"
    ours = OUT / "qwen3-micro-Q4_K_M.gguf"
    theirs = OUT / "qwen3-micro-Q4_K_M.llama-quantize.gguf"
    ggq(console, "convert", str(MODEL), "--type", "F32", "-o", str(f32), "--force")
    ggq(console, "convert", str(MODEL), "--type", "Q4_K_M", "-o", str(ours), "--force")
    cmd = [str(native.tool_path("llama-quantize")), str(f32), str(theirs), "Q4_K_M", "2"]
    subprocess.run(cmd, check=True, capture_output=True)
    same = _same_tensors(ours, theirs)

    table = Table(title=f"qwen3-micro on {TEXT.name} (16 chunks of 512, llama-perplexity)")
    for col in ("file", "MiB", "PPL", "mean KLD vs F32", "same top-1"):
        table.add_column(col)
    for label, path in (("llama.cpp Q4_K_M (llama-quantize)", theirs), ("ggq Q4_K_M (rtn)", ours)):
        r = kld_vs_f32(f32, path)
        table.add_row(
            label,
            f"{path.stat().st_size / 2**20:.1f}",
            f"{r['ppl']:.3f}",
            f"{r['kld']:.5f}",
            f"{r['top1']:.2f}%",
        )
    table.caption = f"F32 PPL {r['ppl_base']:.3f}; ggq's tensors equal llama-quantize's byte for byte: {same}"
    console.print(table)

    llama_cpp = native.import_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(ours), n_ctx=256, verbose=False, n_threads=2, seed=0)
    prompt = "It was a beautiful evening in London, and"
    text = llm.create_completion(prompt, max_tokens=40, temperature=0.0)["choices"][0]["text"]
    console.print(f"[bold]llama.cpp runs ggq's file:[/bold] {prompt}[cyan]{text}[/cyan]")
    ggq(console, "info")
    return 0 if same else 1


def _same_tensors(a: Path, b: Path) -> bool:
    import numpy as np

    from ggq.gguf import read_gguf

    ga, gb = read_gguf(a), read_gguf(b)
    return set(ga.tensors) == set(gb.tensors) and all(
        np.array_equal(ga.tensor_data(n), gb.tensor_data(n)) for n in ga.tensors
    )


if __name__ == "__main__":
    sys.exit(main())
