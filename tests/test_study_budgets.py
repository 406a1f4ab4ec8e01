"""`ggq study --budgets`: per method a size-budget file (`ggq convert --target-bpw`) beside the fixed
recipes, its size held against the budget by gguf-py's reader, cached like every other row, and
the plots drawn against the file size (Pareto plots)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader

from ggq import testing
from ggq.cli import main


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """256-wide rows, untied: every candidate type applies, and the weights outweigh the metadata."""
    spec = replace(testing.WIDE, tie_word_embeddings=False, seed=13)
    return testing.build_checkpoint(tmp_path_factory.mktemp("wide") / "Qwen3-wide", spec)


def _study(model: Path, out: Path, prose: Path, *extra: str) -> tuple[int, str]:
    args = ["study", str(model), "--methods", "rtn,gptq", "--bits", "4", "-f", str(prose), "-c", "128"]
    args += ["--chunks", "2", "--nsamples", "4", "--seqlen", "64", "-o", str(out), *extra]
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


def test_budget_rows_meet_their_budgets_and_are_cached(wide: Path, prose: Path, tmp_path: Path) -> None:
    model, out = wide, tmp_path / "study"
    code, log = _study(model, out, prose, "--budgets", "3.5,5")
    assert code == 0, log
    doc = json.loads((out / "study.json").read_text())
    assert doc["budgets"] == [3.5, 5.0]
    rows = {(r["method"], r["bits"]): r for r in doc["rows"]}
    for method in ("rtn", "gptq"):
        for bpw in ("3.5", "5"):
            row = rows[(f"{method} budget", bpw)]
            assert row["type"] == "mixed"
            path = out / "gguf" / row["file"]
            reader = GGUFReader(path)
            n_weights = sum(int(np.prod(t.shape)) for t in reader.tensors)
            budget = int(float(bpw) * n_weights / 8)
            size = path.stat().st_size
            assert 0.995 * budget <= size <= budget, (path.name, size, budget)
            kinds = {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.")}
            assert len(kinds) > 2  # a mix, not one recipe
            fields = {f.name for f in reader.fields.values()}
            assert "ggq.plan.budget" in fields and "ggq.plan.predicted_kld" in fields
            assert row["texts"]["prose.txt"]["kld"] > 0
    # more bits, less loss: each method's 5 bpw file beats its 3.5 bpw one
    for method in ("rtn", "gptq"):
        lo, hi = rows[(f"{method} budget", "3.5")], rows[(f"{method} budget", "5")]
        assert hi["texts"]["prose.txt"]["kld"] < lo["texts"]["prose.txt"]["kld"]
    assert "| rtn budget | 3.5 | mixed |" in (out / "study.md").read_text()
    for png in ("ppl.png", "kld.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    code, again = _study(model, out, prose, "--budgets", "3.5,5")  # everything cached: no conversion
    assert code == 0, again
    assert "--target-bpw" not in again and "convert " not in again


def test_bad_budgets_are_one_line(checkpoint, prose: Path, tmp_path: Path) -> None:
    for value, message in (
        ("4,x", "--budgets '4,x': expected comma-separated bits per weight"),
        ("0", "--budgets: 0 is not a number of bits per weight in (0, 16]"),
        ("nan", "--budgets: nan is not a number of bits per weight in (0, 16]"),
    ):
        code, log = _study(checkpoint("tied"), tmp_path / "s", prose, "--budgets", value)
        assert code == 2, log
        assert message in log and len(log.strip().splitlines()) == 1, log
