"""`ggq convert --method gptq`: layer-by-layer GPTQ written into standard GGUF blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ggq import ggml
from ggq.checkpoint import Checkpoint
from ggq.cli import main
from ggq.convert import ConvertOptions, convert
from ggq.eval import llama_tools
from ggq.gguf import read_gguf
from ggq.plan import recipe as rc
from ggq.solvers.gptq import supported_types
from tests.convert_helpers import check_trio, micro_trio, solver_gguf


@pytest.fixture(scope="module")
def micro_files(qwen3_micro: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return micro_trio(qwen3_micro, tmp_path_factory.mktemp("gptq"), "gptq", "Q4_K_M")


def test_gptq_file_has_rtn_layout_and_provenance(micro_files: dict[str, Path]) -> None:
    changed = check_trio(micro_files, "gptq")
    assert micro_files["gptq"].stat().st_size == pytest.approx(micro_files["rtn"].stat().st_size, rel=0.01)
    assert read_gguf(micro_files["gptq"]).metadata["ggq.calibration.seed"] == 0
    # the tied head is solved too (solvers/head.py); the norms GPTQ never touches
    assert any(".ffn_down." in n for n in changed) and "token_embd.weight" in changed
    assert not any(n.endswith("_norm.weight") for n in changed)


def test_gptq_is_closer_to_f32_than_rtn(micro_files: dict[str, Path], heldout: Path, tmp_path: Path) -> None:
    """Judged by llama.cpp itself: llama-perplexity's KL-divergence on held-out text."""
    text = heldout
    base = llama_tools.kld_base(micro_files["F32"], text, tmp_path / "base.kld", chunks=12)
    rtn, gptq = (llama_tools.kld(micro_files[k], base, chunks=12) for k in ("rtn", "gptq"))
    assert gptq["kld"] < 0.9 * rtn["kld"], (gptq, rtn)
    assert gptq["top1"] >= rtn["top1"] - 0.5


def test_gptq_is_deterministic(checkpoint, tmp_path: Path) -> None:
    ckpt_dir = checkpoint("untied")
    a = solver_gguf(ckpt_dir, tmp_path / "a.gguf", "Q8_0", "gptq", nsamples=4, seqlen=64)
    b = solver_gguf(ckpt_dir, tmp_path / "b.gguf", "Q8_0", "gptq", nsamples=4, seqlen=64)
    assert a.read_bytes() == b.read_bytes()
    rtn = tmp_path / "rtn.gguf"
    convert(Checkpoint(ckpt_dir), rtn, ConvertOptions(rc.RecipeOptions("Q8_0")))
    ours, theirs = read_gguf(a), read_gguf(rtn)
    assert {n: t.nbytes for n, t in ours.tensors.items()} == {n: t.nbytes for n, t in theirs.tensors.items()}
    assert any(not np.array_equal(ours.tensor_data(n), theirs.tensor_data(n)) for n in ours.tensors)


def test_gptq_untargetable_type_is_one_line(qwen3_micro: Path, tmp_path: Path) -> None:
    """A type GPTQ has no target for (qwen3-micro's 256-wide rows take 256-blocks without fallback)."""
    unsupported = sorted(set(ggml.FORMATS) - set(ggml.FLOAT_TYPES) - set(supported_types()))
    if not unsupported:
        pytest.skip("GPTQ targets every block type")
    out = tmp_path / "x.gguf"
    args = ["convert", str(qwen3_micro), "--method", "gptq", "--pure", "-o", str(out)]
    result = CliRunner().invoke(main, [*args, "--type", unsupported[0]])
    assert result.exit_code == 2 and f"GPTQ cannot target {unsupported[0]}" in result.output
    assert not out.exists()


def test_gptq_bad_input_is_one_line(checkpoint, tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    args = ["convert", str(checkpoint("tied")), "--method", "gptq", "-o", str(out)]
    short = tmp_path / "short.txt"
    short.write_text("a few words " * 30)
    result = CliRunner().invoke(main, [*args, "--type", "Q8_0", "--calib", str(short)])
    assert result.exit_code == 2 and "shorter than one window of 512" in result.output
    assert not out.exists()
