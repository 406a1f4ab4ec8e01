"""`make demo`: the main job on the embedded default model (models/qwen3-micro).

1. `ggq convert --method awq --bits 4` calibrates qwen3-micro layer by layer and writes a
   standard Q4_K_M GGUF; `ggq convert --type F32` writes the full-precision reference;
2. `ggq ppl --base F32 --vs-q4_0` scores ggq's file next to the Q4_0 llama.cpp's own quantizer
   makes from the same F32 file, and the F32 itself: PPL, ΔPPL, KL-divergence, same top p;
3. llama.cpp's own `llama-perplexity --kl-divergence` scores ggq's file too, the independent check;
4. llama.cpp (through llama-cpp-python, the same build) continues a prompt with ggq's file.
"""

from __future__ import annotations

import sys
from pathlib import Path

from click.testing import CliRunner
from rich.console import Console

from ggq import native
from ggq.cli import main as ggq_main
from ggq.eval import llama_tools

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "qwen3-micro"
TEXT = MODEL / "heldout-sample.txt"
OUT = ROOT / "out" / "demo"
CHUNKS = 16


def ggq(console: Console, *args: str) -> None:
    console.print(f"[bold]$ ggq {' '.join(args)}[/bold]")
    result = CliRunner().invoke(ggq_main, list(args), env={"COLUMNS": "160"})
    sys.stdout.write(result.output)  # as the command printed it (tables 160 columns wide)
    sys.stdout.flush()
    if result.exit_code != 0:
        raise SystemExit(result.exit_code)


def main() -> int:
    console = Console()
    OUT.mkdir(parents=True, exist_ok=True)
    f32 = OUT / "qwen3-micro-F32.gguf"
    ours = OUT / "qwen3-micro-Q4_K_M.gguf"
    ggq(console, "convert", str(MODEL), "--type", "F32", "-o", str(f32), "--force")
    ggq(console, "convert", str(MODEL), "--method", "awq", "--bits", "4", "-o", str(ours), "--force")
    ggq(console, "ppl", str(ours), "--base", str(f32), "--vs-q4_0", "-f", str(TEXT), "--chunks", str(CHUNKS))

    base = llama_tools.kld_base(f32, TEXT, OUT / "f32.kld", chunks=CHUNKS)
    r = llama_tools.kld(ours, base, chunks=CHUNKS)
    console.print(
        f"[bold]llama-perplexity --kl-divergence on ggq's file:[/bold] PPL {r['ppl']:.4f} "
        f"(F32 from its stored 16-bit log-probs {r['ppl_base']:.4f}), mean KLD {r['kld']:.6f}, same top p {r['top1']:.3f}%"
    )

    llama_cpp = native.import_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(ours), n_ctx=256, verbose=False, n_threads=2, seed=0)
    prompt = "It was a beautiful evening in London, and"
    text = llm.create_completion(prompt, max_tokens=40, temperature=0.0)["choices"][0]["text"]
    console.print(f"[bold]llama.cpp runs ggq's file:[/bold] {prompt}[cyan]{text}[/cyan]")
    ggq(console, "info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
