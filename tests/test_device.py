"""`ggq convert --device`: the calibration on a torch device, the same bytes on the CPU whichever
way it is chosen, and one clear line when CUDA is asked for and torch has none."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ggq.checkpoint import Checkpoint
from ggq.cli import main
from ggq.convert import CalibOptions, ConvertOptions, convert
from ggq.gguf import read_gguf
from ggq.gguf import recipe as rc
from ggq.solvers.layerwise import LayerReport, resolve_device

SMALL = {"nsamples": 4, "seqlen": 64}


def _convert(ckpt_dir: Path, out: Path, method: str, device: str, reports: list[LayerReport]) -> Path:
    opts = ConvertOptions(rc.RecipeOptions("Q4_0"), method=method, cal=CalibOptions(**SMALL, device=device))  # type: ignore[arg-type]
    convert(Checkpoint(ckpt_dir), out, opts, layer_report=reports.append)
    return out


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_cpu_and_auto_give_the_same_bytes(checkpoint, tmp_path: Path, method: str) -> None:
    """On a machine without CUDA auto is the CPU path, and the CPU path is the plain torch code:
    the device copy of the weights is the weights themselves."""
    if torch.cuda.is_available():
        pytest.skip("auto picks CUDA here")
    ckpt_dir = checkpoint("untied")
    a = _convert(ckpt_dir, tmp_path / "cpu.gguf", method, "cpu", [])
    b = _convert(ckpt_dir, tmp_path / "auto.gguf", method, "auto", [])
    assert a.read_bytes() == b.read_bytes()


def test_cuda_without_cuda_is_one_line(checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    out = tmp_path / "x.gguf"
    args = ["convert", str(checkpoint("tied")), "-o", str(out), "--method", "awq", "--device", "cuda"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "--device cuda: torch sees no CUDA device (torch " in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["gptq", "awq", "awq+gptq"])
def test_cuda_matches_cpu_up_to_rounding(checkpoint, tmp_path: Path, method: str) -> None:
    """Same layout, and per linear the solver's output error within a few percent of the CPU's
    (the device's float sums differ in the last bits, so the choices may differ here and there)."""
    ckpt_dir = checkpoint("untied")
    on_cpu: list[LayerReport] = []
    on_cuda: list[LayerReport] = []
    a = read_gguf(_convert(ckpt_dir, tmp_path / "cpu.gguf", method, "cpu", on_cpu))
    b = read_gguf(_convert(ckpt_dir, tmp_path / "cuda.gguf", method, "cuda", on_cuda))
    assert {n: (t.type_id, t.nbytes) for n, t in a.tensors.items()} == {
        n: (t.type_id, t.nbytes) for n, t in b.tensors.items()
    }
    for ra, rb in zip(on_cpu, on_cuda, strict=True):
        for name, (_, err) in ra.errors.items():
            assert rb.errors[name][1] == pytest.approx(err, rel=0.05), (ra.layer, name)
