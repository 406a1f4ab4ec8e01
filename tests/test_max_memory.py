"""`ggq convert --max-memory SIZE`: the solver's batch and where it keeps the residual stream
follow the budget (the bytes written do not), its measured peak stays under it, and a budget
below what one layer needs is one line before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ggq import testing
from ggq.checkpoint import Checkpoint
from ggq.cli import main
from ggq.convert import ConvertOptions, make_plan
from ggq.plan import recipe as rc
from ggq.solvers import layerwise
from ggq.solvers.options import SolverError, SolverOptions, fit_memory, memory_need


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One layer whose MLP is 16x its width (as tests/test_solver_memory.py's)."""
    spec = testing.Qwen3Spec(
        hidden_size=256, intermediate_size=4096, head_dim=64, num_hidden_layers=1, seed=9
    )
    return testing.build_checkpoint(tmp_path_factory.mktemp("wide") / "ckpt", spec)


def test_below_one_layer_is_one_line_before_any_work(wide: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    args = ["convert", str(wide), "--method", "gptq", "--nsamples", "4", "--seqlen", "64"]
    result = CliRunner().invoke(main, [*args, "--max-memory", "64M", "-o", str(out)])
    assert result.exit_code == 2, result.output
    need = memory_need(Checkpoint(wide).hparams, 4, 64, "gptq").total(1, spill=True)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"--max-memory 64 MiB: one layer of gptq needs at least {need / 2**20:.0f} MiB" in lines[0]
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_bad_size_is_one_line(wide: Path, tmp_path: Path) -> None:
    args = ["convert", str(wide), "--method", "gptq", "--max-memory", "3X", "-o", str(tmp_path / "x.gguf")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "--max-memory '3X': not a size; accepted: bytes" in result.output.strip().splitlines()[-1]


def test_the_budget_picks_the_batch_and_the_residual_file(wide: Path) -> None:
    hp = Checkpoint(wide).hparams
    need = memory_need(hp, 12, 128, "gptq")
    roomy = fit_memory(SolverOptions(max_memory=1 << 40), hp, 12, 128)
    assert roomy.batch == 8 and roomy.max_residual_bytes >= need.residual  # in memory
    tight = fit_memory(SolverOptions(max_memory=need.total(2, spill=True) + 1), hp, 12, 128)
    assert tight.batch == 2 and tight.max_residual_bytes == 0  # in a file
    assert fit_memory(SolverOptions(max_memory=0), hp, 12, 128) == SolverOptions()
    with pytest.raises(SolverError, match="needs at least"):
        fit_memory(SolverOptions(max_memory=need.total(1, spill=True) - 1), hp, 12, 128)


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_a_tight_budget_gives_the_same_bytes(wide: Path, method: str) -> None:
    ckpt = Checkpoint(wide)
    types = {t.name: t.type for t in make_plan(ckpt, ConvertOptions(rc.RecipeOptions("Q4_K_M")))}
    tokens = np.random.default_rng(0).integers(0, ckpt.hparams.n_vocab, (12, 128))
    tight = memory_need(ckpt.hparams, 12, 128, method).total(2, spill=True) + 1
    found = []
    for budget in (0, tight):
        opts = SolverOptions(method=method, max_memory=budget)
        found.append([r for _, r in layerwise.solve_layers(ckpt, tokens, types, opts)])
    for a, b in zip(*found, strict=True):
        assert a.tensors.keys() == b.tensors.keys()
        for k in a.tensors:
            assert np.array_equal(a.tensors[k], b.tensors[k]), k


PEAK = """
import json, sys
from ggq.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    assert e.code == 0, e.code
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(json.dumps(int(hwm.split()[1]) * 1024))
"""


@pytest.mark.parametrize("windows", [2, 8])
def test_the_measured_peak_stays_under_the_budget(wide: Path, tmp_path: Path, windows: int) -> None:
    """A whole `ggq convert` process given exactly the estimate at ``windows`` per batch: its peak
    RSS (VmHWM) is under it, and not far under (an estimate of twice the peak would fail)."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux's /proc/self/status")
    need = memory_need(Checkpoint(wide).hparams, 16, 256, "gptq")
    budget = need.total(windows, spill=windows < 8)
    args = ["convert", str(wide), "--method", "gptq", "--nsamples", "16", "--seqlen", "256"]
    args += ["--max-memory", str(budget), "-o", str(tmp_path / "x.gguf")]
    done = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    peak = json.loads(done.stdout.splitlines()[-1])
    assert budget / 2 < peak <= budget, (peak / 2**20, budget / 2**20)
