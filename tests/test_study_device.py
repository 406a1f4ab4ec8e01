"""`ggq study --device` reaches every conversion the study makes, and a device torch cannot use
is one line before any file is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ggq import study
from ggq.cli import main


def test_study_device_reaches_the_conversions(
    checkpoint, prose: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, str]] = []

    def run(self: study.Study) -> dict:
        for m in self.cfg.methods:
            seen.append((m, self.options("Q4_0", m).cal.device))
        return {}

    monkeypatch.setattr(study.Study, "run", run)
    monkeypatch.setattr(study, "render_markdown", lambda doc: "")
    args = ["study", str(checkpoint("untied")), "--methods", "rtn,gptq,awq", "--device", "cpu"]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "s"), "-f", str(prose)])
    assert result.exit_code == 0, result.output
    assert seen == [("rtn", "cpu"), ("gptq", "cpu"), ("awq", "cpu")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a CUDA device here")
def test_study_device_cuda_without_cuda_is_one_line(checkpoint, prose: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    args = ["study", str(checkpoint("untied")), "--methods", "gptq", "--device", "cuda", "-o", str(out)]
    result = CliRunner().invoke(main, [*args, "-f", str(prose)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--device cuda: torch sees no CUDA device" in lines[0], lines
    assert not out.exists()
