"""`ggq bench`: llama-bench's speeds per file and each file's peak memory, side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ggq.cli import main
from tests.test_convert import to_gguf


@pytest.fixture(scope="module")
def files(checkpoint, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The full-vocab fixture: its 151,936-row embedding makes F32 and Q4_0 differ by ~14 MiB."""
    out = tmp_path_factory.mktemp("bench")
    ckpt = checkpoint("full-vocab")
    return {t: to_gguf(ckpt, out / f"fv-{t}.gguf", t) for t in ("F32", "Q4_0")}


def test_bench_reports_speed_and_memory_per_file(files: dict[str, Path]) -> None:
    args = [
        "bench",
        str(files["F32"]),
        str(files["Q4_0"]),
        "-p",
        "32",
        "-n",
        "8",
        "-r",
        "3",
        "-t",
        "2",
        "--json",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = {r["file"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"fv-F32.gguf", "fv-Q4_0.gguf"}
    for r in rows.values():
        assert [s["test"] for s in r["speeds"]] == ["pp32", "tg8"]
        for s in r["speeds"]:
            assert len(s["samples"]) == 3 and s["low"] <= s["median"] <= s["high"] and s["median"] > 0
    f32, q4 = rows["fv-F32.gguf"], rows["fv-Q4_0.gguf"]
    assert f32["info"]["type"] == "F32" and q4["info"]["type"] == "Q4_0"
    # the weights llama.cpp keeps resident show in the peak: most of the file-size difference
    size_diff = f32["info"]["size_mib"] - q4["info"]["size_mib"]
    assert size_diff > 10
    assert f32["peak_rss_mib"] - q4["peak_rss_mib"] > 0.5 * size_diff, (
        f32["peak_rss_mib"],
        q4["peak_rss_mib"],
    )


def test_bench_table(files: dict[str, Path]) -> None:
    args = ["bench", str(files["Q4_0"]), "-p", "16", "-n", "4", "-r", "2", "-t", "2"]
    result = CliRunner().invoke(main, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "pp16 t/s" in result.stdout and "tg4 t/s" in result.stdout and "fv-Q4_0.gguf" in result.stdout


def test_bench_bad_input_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    result = CliRunner().invoke(main, ["bench", str(bad)])
    assert result.exit_code == 2 and "x.gguf" in result.output
