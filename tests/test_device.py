"""`ggq convert --device`: auto means CUDA exactly when torch sees it and reaches the solver so;
the CPU results do not lean on the device copies being the weights themselves; one clear line
when CUDA is asked for and torch has none. On a CUDA machine (tests marked ``cuda``): the CUDA
path gives the CPU's layout and output errors, and the same bytes run after run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ggq.convert as convert_mod
from ggq.checkpoint import Checkpoint
from ggq.cli import main
from ggq.convert import CalibOptions, ConvertOptions, convert
from ggq.gguf import read_gguf
from ggq.plan import recipe as rc
from ggq.solvers.gptq import SolverError
from ggq.solvers.layerwise import LayerReport, SolverOptions, _Layer
from ggq.solvers.options import resolve_device

SMALL = {"nsamples": 4, "seqlen": 64}

without_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _convert(ckpt_dir: Path, out: Path, method: str, device: str, reports: list[LayerReport]) -> Path:
    opts = ConvertOptions(rc.RecipeOptions("Q4_0"), method=method, cal=CalibOptions(**SMALL, device=device))  # type: ignore[arg-type]
    convert(Checkpoint(ckpt_dir), out, opts, layer_report=reports.append)
    return out


def test_auto_is_cuda_exactly_when_torch_sees_one(monkeypatch: pytest.MonkeyPatch) -> None:
    for available, auto in ((False, "cpu"), (True, "cuda")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda a=available: a)
        assert resolve_device("auto") == auto
        assert resolve_device("cpu") == "cpu"
    with pytest.raises(SolverError, match="--device tpu: unknown"):
        resolve_device("tpu")


class _Stop(Exception):
    pass


def test_auto_reaches_the_solver_as_the_device_torch_sees(
    checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``convert`` hands the solver the resolved device, never "auto" (torch has no such device)."""
    seen: list[str] = []

    def solver(*args: object, **kwargs: object) -> Iterator[object]:
        opts = next(a for a in (*args, *kwargs.values()) if isinstance(a, SolverOptions))
        seen.append(opts.device)
        raise _Stop
        yield  # a generator, as solve_layers is

    monkeypatch.setattr(convert_mod, "solve_layers", solver)
    for available in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda a=available: a)
        with pytest.raises(_Stop):
            _convert(checkpoint("tied"), tmp_path / f"{available}.gguf", "gptq", "auto", [])
    assert seen == ["cpu", "cuda"]


@pytest.mark.parametrize("method", ["gptq", "awq", "awq+gptq"])
def test_separate_device_copies_give_the_cpu_bytes(
    checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """On the CPU the solver's device copy of a weight is the weight itself, so code that changes a
    weight in place without refreshing its copy, or writes through the copy, is right on the CPU
    and wrong on a GPU. With the copies kept as separate tensors, as on a GPU, the bytes must be
    those of the CPU run."""
    ckpt_dir = checkpoint("untied")
    aliased = _convert(ckpt_dir, tmp_path / "cpu.gguf", method, "cpu", []).read_bytes()

    def refresh(self: _Layer, *names: str) -> None:
        for n in names:
            self.dev[n] = self.w[n].clone()

    monkeypatch.setattr(_Layer, "refresh", refresh)
    separate = _convert(ckpt_dir, tmp_path / "separate.gguf", method, "cpu", []).read_bytes()
    assert separate == aliased


def test_cuda_without_cuda_is_one_line(checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    out = tmp_path / "x.gguf"
    args = ["convert", str(checkpoint("tied")), "-o", str(out), "--method", "awq", "--device", "cuda"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "--device cuda: torch sees no CUDA device (torch " in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("method", ["gptq", "awq", "awq+gptq"])
@pytest.mark.cuda
@without_cuda
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


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
@pytest.mark.cuda
@without_cuda
def test_cuda_gives_the_same_bytes_run_after_run(checkpoint, tmp_path: Path, method: str) -> None:
    """auto is CUDA here; two runs give one file (the device's sums are in a fixed order too)."""
    ckpt_dir = checkpoint("untied")
    a = _convert(ckpt_dir, tmp_path / "a.gguf", method, "auto", []).read_bytes()
    b = _convert(ckpt_dir, tmp_path / "b.gguf", method, "cuda", []).read_bytes()
    assert a == b
