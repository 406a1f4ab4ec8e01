"""`make demo`: the main job on an embedded default.

Until the converter lands this builds a tiny Qwen3 checkpoint (Hugging Face format, the real
Qwen3 tokenizer), runs it once through transformers, and prints `ggq info`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from click.testing import CliRunner
from rich.console import Console

from ggq import testing
from ggq.cli import main as ggq_main

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    console = Console()
    out = ROOT / "out" / "demo" / "qwen3-tiny"
    testing.build_checkpoint(out, "tied")
    console.print(f"[bold]tiny Qwen3 checkpoint[/bold] written to {out}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hello!"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    n_params = sum(p.numel() for p in model.parameters())
    console.print(
        f"transformers loads it: {n_params:,} parameters, {ids.shape[1]} prompt tokens, logits {tuple(logits.shape)}"
    )
    console.print("[bold]ggq info[/bold]")
    result = CliRunner().invoke(ggq_main, ["info"])
    console.print(result.output, end="")
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
