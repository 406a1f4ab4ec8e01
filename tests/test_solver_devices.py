"""Which device each part of the solvers uses is said where a user looks (the per-layer report,
its JSON, `ggq info`), and `GGQ_CUDA=ON make` asks pip for the CUDA torch rather than a local
CPU wheel."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from packaging.specifiers import SpecifierSet

from ggq.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_info_says_the_torch_build_and_the_solver_devices() -> None:
    result = CliRunner().invoke(main, ["info", "--json"])
    assert result.exit_code == 0, result.output
    tr = json.loads(result.output)["torch"]
    assert tr["version"] == torch.__version__ and tr["cuda_build"] == torch.version.cuda
    assert tr["cuda_available"] == torch.cuda.is_available()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    assert tr["solver_devices"]["forward"] == tr["solver_devices"]["stats"] == dev
    assert tr["solver_devices"]["gptq"] == tr["solver_devices"]["encode"] == "cpu"
    table = CliRunner().invoke(main, ["info"]).output
    line = next(x for x in table.splitlines() if x.startswith("torch build"))
    assert ("built without CUDA" in line) == (torch.version.cuda is None), line
    assert "gptq, encode on cpu" in table


def test_the_layer_report_says_the_devices(checkpoint, tmp_path: Path) -> None:
    args = ["convert", str(checkpoint("untied")), "--method", "gptq", "--device", "cpu"]
    args += ["--nsamples", "2", "--seqlen", "32", "-o", str(tmp_path / "x.gguf")]
    text = CliRunner().invoke(main, args)
    assert text.exit_code == 0, text.output
    assert "solver devices: forward, stats, awq_search, diag, gptq, encode on cpu" in text.output
    (tmp_path / "x.gguf").unlink()
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    layers = json.loads(result.stdout)["layers"]
    assert layers and all(
        la["devices"]["forward"] == "cpu" and la["devices"]["gptq"] == "cpu" for la in layers
    )


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_cuda_make_asks_for_exactly_the_pypi_torch() -> None:
    """pip takes the highest version a specifier matches, and ``==2.13.0`` matches a local
    ``2.13.0+cpu`` wheel (which sorts above 2.13.0): only ``===`` excludes it (packaging's rules)."""
    assert "2.13.0+cpu" in SpecifierSet("==2.13.0") and "2.13.0+cpu" not in SpecifierSet("===2.13.0")
    assert "2.13.0" in SpecifierSet("===2.13.0")
    for cuda, spec in (("ON", '"torch===2.13.0"'), ("OFF", '"torch==2.13.0"')):
        plan = subprocess.run(
            ["make", "-n", "-B", f".venv/.torch-{cuda}", f"GGQ_CUDA={cuda}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert plan.returncode == 0, plan.stderr
        assert f"install -q {spec}" in plan.stdout, plan.stdout
