"""The README's headline claim, on a bare clone: on the embedded trained model and the shipped
held-out text, ggq's calibrated Q4_0 files (gptq, awq+gptq) are closer to the F32 model than the
Q4_0 llama.cpp itself makes with an importance matrix (llama-imatrix on the same calibration text,
then llama-quantize), by a margin several times the statistic's uncertainty. Judged by llama.cpp's
own llama-perplexity --kl-divergence, not by ggq's evaluator."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest

from ggq import native
from ggq.checkpoint import Checkpoint
from ggq.convert import CalibOptions, ConvertOptions, convert
from ggq.eval import llama_tools
from ggq.plan import recipe as rc

NSAMPLES, SEQLEN = 16, 256  # ggq's calibration: 4,096 tokens of the shipped calibration text
CHUNKS = 16  # of 512 tokens of held-out text (8,192 scored positions)


def _tool(name: str, *args: str) -> None:
    done = subprocess.run([str(native.tool_path(name)), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def q4_0_files(
    qwen3_micro: Path, calibration_text: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("quality")
    files = {"F32": d / "f32.gguf"}
    convert(Checkpoint(qwen3_micro), files["F32"], ConvertOptions(rc.RecipeOptions("F32")))
    # llama.cpp's imatrix Q4_0: the same number of calibration tokens (8 chunks of 512) of the same text
    imatrix = d / "imatrix.gguf"
    _tool("llama-imatrix", "-m", str(files["F32"]), "-f", str(calibration_text), "-o", str(imatrix),
          "-c", "512", "--chunks", str(NSAMPLES * SEQLEN // 512), "-t", "2")  # fmt: skip
    files["imatrix"] = d / "llama-imatrix-q4_0.gguf"
    _tool("llama-quantize", "--imatrix", str(imatrix), str(files["F32"]), str(files["imatrix"]), "Q4_0")
    cal = CalibOptions(nsamples=NSAMPLES, seqlen=SEQLEN)
    for method in ("gptq", "awq+gptq"):
        files[method] = d / f"{method}-q4_0.gguf"
        convert(
            Checkpoint(qwen3_micro), files[method], ConvertOptions(rc.RecipeOptions("Q4_0"), method, cal=cal)
        )
    return files


@pytest.fixture(scope="module")
def imatrix_q4_0(q4_0_files: dict[str, Path], heldout: Path) -> tuple[Path, dict[str, float]]:
    """The F32 log-probs over the held-out chunks, and llama.cpp's imatrix Q4_0 judged on them."""
    base = q4_0_files["F32"].with_suffix(".kld")
    llama_tools.kld_base(q4_0_files["F32"], heldout, base, chunks=CHUNKS)
    return base, llama_tools.kld_stats(q4_0_files["imatrix"], base, chunks=CHUNKS)


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_calibrated_q4_0_beats_llama_cpp_imatrix_q4_0(
    q4_0_files: dict[str, Path], imatrix_q4_0: tuple[Path, dict[str, float]], method: str
) -> None:
    base, ref = imatrix_q4_0
    ours = llama_tools.kld_stats(q4_0_files[method], base, chunks=CHUNKS)
    margin = ref["kld"] - ours["kld"]
    spread = math.hypot(ref["kld_err"], ours["kld_err"])  # as if independent: larger than the paired ±
    assert margin > 3 * spread, (ours["kld"], ours["kld_err"], ref["kld"], ref["kld_err"])
    assert ours["kld"] < 0.75 * ref["kld"], (ours["kld"], ref["kld"])
    assert ours["same_top"] > ref["same_top"] and ours["kld_p999"] < ref["kld_p999"]
