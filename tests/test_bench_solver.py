"""The solver's per-layer time split (LayerReport.times) and tools/bench_solver.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from ggq import testing
from ggq.solvers.options import PARTS, clock, timed

ROOT = Path(__file__).resolve().parent.parent


def test_nested_parts_are_charged_to_the_innermost() -> None:
    times: dict[str, float] = {}
    with clock(times):
        with timed("solve"):
            time.sleep(0.05)
            with timed("encode"):
                time.sleep(0.1)
        with timed("diag"), timed("encode"):  # inside diag: what turning diagnostics off saves
            time.sleep(0.05)
    assert set(times) == {"solve", "encode", "diag"}
    assert 0.1 <= times["encode"] < 0.14
    assert 0.05 <= times["solve"] < 0.09  # less the nested encode
    assert 0.05 <= times["diag"] < 0.09


def test_outside_a_clock_nothing_is_recorded() -> None:
    with timed("solve"):
        pass  # no clock: no error, nothing kept


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = replace(testing.WIDE, seed=3)
    return testing.build_checkpoint(tmp_path_factory.mktemp("bench") / "ckpt", spec)


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_bench_times_add_up_to_the_layer(ckpt: Path, method: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "tools" / "bench_solver.py"), "--checkpoint", str(ckpt)]
    cmd += ["--methods", method, "--nsamples", "4", "--seqlen", "64", "--threads", "1", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "dominant part:" in done.stdout
    (run,) = json.loads(out.read_text())["runs"]
    assert [r["layer"] for r in run["layers"]] == [0, 1]
    for rec in run["layers"]:
        times = rec["times"]
        assert set(times) <= set(PARTS) and {"load", "forward", "stats", "solve", "encode", "diag"} <= set(
            times
        )
        assert all(t >= 0 for t in times.values())
        # the parts cover the layer: what is outside every part is a small remainder
        assert sum(times.values()) <= rec["seconds"] + 1e-6
        assert sum(times.values()) >= 0.9 * rec["seconds"], (times, rec["seconds"])
        assert rec["peak_rss_mib"] > 100  # torch alone is more
    assert run["head_seconds"] > 0  # the output head, solved after the last layer
    assert "head" in done.stdout
    # the 0.6B shape: 28 layers and the head
    assert run["projected_seconds"] == pytest.approx(run["seconds_per_layer"] * 28 + run["head_seconds"])
