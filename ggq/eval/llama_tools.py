"""llama.cpp's own `llama-perplexity --kl-divergence`, run and read: the reference ggq's quants
are judged by (tools/bench_quality.py, the demo, tests).

At this pin the tool's asynchronous logger can exit with its last lines unprinted (about one run
in ten, exit code 0; llama.cpp issue 22142), so a run whose summary is missing is repeated.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from ggq import native

KLD_FIELDS = {
    "ppl": r"Mean PPL\(Q\)\s*:\s*([0-9.]+)",
    "ppl_base": r"Mean PPL\(base\)\s*:\s*([0-9.]+)",
    "kld": r"Mean\s+KLD:\s+([0-9.]+)",
    "top1": r"Same top p:\s+([0-9.]+)",  # percent
}
ATTEMPTS = 5


class LlamaToolError(RuntimeError):
    """llama-perplexity failed or never printed what was asked for."""


def _common(n_ctx: int, chunks: int, threads: int) -> list[str]:
    return ["-c", str(n_ctx), "--chunks", str(chunks), "-t", str(threads)]


def kld_base(f32: Path, text: Path, out: Path, n_ctx: int = 512, chunks: int = 40, threads: int = 2) -> Path:
    """Save the base model's log-probabilities over ``text`` (llama-perplexity --kl-divergence-base)."""
    cmd = [
        str(native.tool_path("llama-perplexity")),
        "-m",
        str(f32),
        "-f",
        str(text),
        *_common(n_ctx, chunks, threads),
    ]
    done = subprocess.run([*cmd, "--kl-divergence-base", str(out)], capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        raise LlamaToolError(
            f"llama-perplexity --kl-divergence-base failed:\n{(done.stdout + done.stderr)[-3000:]}"
        )
    return out


def kld(model: Path, base: Path, n_ctx: int = 512, chunks: int = 40, threads: int = 2) -> dict[str, float]:
    """PPL of ``model`` and of the base, mean KLD and same-top-1 (%) against a ``kld_base`` file."""
    cmd = [str(native.tool_path("llama-perplexity")), "-m", str(model), "--kl-divergence-base", str(base)]
    cmd += ["--kl-divergence", *_common(n_ctx, chunks, threads)]
    log = ""
    for _ in range(ATTEMPTS):
        done = subprocess.run(cmd, capture_output=True, text=True)
        log = done.stdout + done.stderr
        if done.returncode != 0:
            break
        found = {key: re.search(pattern, log) for key, pattern in KLD_FIELDS.items()}
        if all(found.values()):
            return {key: float(m.group(1)) for key, m in found.items() if m}
    raise LlamaToolError(f"llama-perplexity --kl-divergence gave no summary for {model}:\n{log[-3000:]}")
