"""`ggq study`: every (method, bits) converted and judged against the base, llama.cpp's own quants
beside them, cached so that a re-run does only what is missing; zero-shot tasks through
llama-perplexity's own scoring of hand-made task files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ggq import tasks
from ggq.cli import main
from ggq.eval import llama_tools
from ggq.study import Study, StudyConfig, StudyError


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hand-made task files in llama.cpp's three formats."""
    d = tmp_path_factory.mktemp("tasks")
    hellaswag = [
        (
            "Cooking: She cracked the eggs into the bowl and",
            1,
            ["flew away.", "whisked them.", "sang.", "slept."],
        ),
        (
            "Reading: He opened the old book and",
            0,
            ["read the first page.", "ate it.", "drove it.", "sold the sea."],
        ),
    ]
    lines = [line for ctx, gold, ends in hellaswag for line in (ctx, str(gold), *ends)]
    (d / "hellaswag-mini.txt").write_text("\n".join(lines) + "\n")
    (d / "winogrande-mini.csv").write_text(
        "1,The trophy would not fit in the suitcase because the _ was too big.,trophy,suitcase,1\n"
        "2,The cat chased the mouse until the _ was caught.,cat,mouse,2\n"
    )
    tasks.save_multiple_choice(
        d / "arc-mini.bin",
        [("Question: What color is a clear sky?\nAnswer:", [" blue", " green", " red"], 0)] * 3,
    )
    return d


def run_study(model: Path, out: Path, prose: Path, *extra: str) -> tuple[dict, str]:
    args = ["study", str(model), "--methods", "rtn,awq", "--bits", "4", "-f", str(prose), "-c", "128"]
    args += ["--chunks", "4", "--nsamples", "4", "--seqlen", "64", "-o", str(out), *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return json.loads((out / "study.json").read_text()), result.output


def test_study_end_to_end_and_resumable(checkpoint, prose: Path, tmp_path: Path) -> None:
    model = checkpoint("untied")
    out = tmp_path / "study"
    doc, _ = run_study(model, out, prose)
    methods = [(r["method"], r["bits"], r["type"]) for r in doc["rows"]]
    assert methods == [
        ("base", "32", "F32"),
        ("llama.cpp RTN", "4", "Q4_K_M"),
        ("llama.cpp imatrix", "4", "Q4_K_M"),
        ("rtn", "4", "Q4_K_M"),
        ("awq", "4", "Q4_K_M"),
    ]
    table = (out / "study.md").read_text()
    assert table.splitlines()[0].startswith("| Method | #W | type | bpw | MiB | PPL prose.txt")
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 6
    for png in ("ppl.png", "kld.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # an independent check of one row: llama-perplexity's own KLD of the llama.cpp RTN file
    files = {r["method"]: out / "gguf" / r["file"] for r in doc["rows"]}
    base_kld = llama_tools.kld_base(files["base"], prose, tmp_path / "b.kld", n_ctx=128, chunks=4)
    ref = llama_tools.kld_stats(files["llama.cpp RTN"], base_kld, n_ctx=128, chunks=4)
    row = next(r for r in doc["rows"] if r["method"] == "llama.cpp RTN")["texts"]["prose.txt"]
    assert row["kld"] == pytest.approx(ref["kld"], rel=0.01, abs=1e-6)
    assert row["ppl"] == pytest.approx(ref["ppl"], rel=1e-4)
    # ggq rtn equals llama.cpp RTN byte for byte, so the two rows agree exactly
    rtn = next(r for r in doc["rows"] if r["method"] == "rtn")["texts"]["prose.txt"]
    assert rtn["kld"] == row["kld"]

    # a re-run converts and evaluates nothing and gives the same numbers
    again, log2 = run_study(model, out, prose)
    assert "convert" not in log2 and "ggq ppl" not in log2 and "llama-quantize" not in log2
    assert again["rows"] == doc["rows"]
    # with one more method, only that method is converted and evaluated
    _, log3 = run_study(model, out, prose, "--methods", "rtn,awq,gptq")
    assert "--method gptq" in log3 and "--method awq" not in log3 and "1 file(s) in one pass" in log3


def test_zero_shot_tasks_through_llama_perplexity(checkpoint, task_dir: Path, tmp_path: Path) -> None:
    from tests.test_convert import to_gguf

    gguf = to_gguf(checkpoint("tied"), tmp_path / "tied-Q8_0.gguf", "Q8_0")
    scores = tasks.run_tasks(gguf, task_dir, tmp_path / "cache", threads=2, log=lambda _: None)
    assert set(scores) == {"hellaswag-mini", "winogrande-mini", "arc-mini"}
    assert all(0 <= v <= 100 for v in scores.values())
    # the hand-made multiple-choice file is llama.cpp's format: three identical tasks, one score
    assert scores["arc-mini"] in (0.0, 100.0)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 3


def test_bad_options_are_one_line(checkpoint, prose: Path, tmp_path: Path) -> None:
    model = str(checkpoint("untied"))
    for args, message in (
        (["--methods", "rtn,smoothquant"], "'smoothquant' is not one of rtn, gptq, awq"),
        (["--bits", "7"], "--bits: '7' is not one of"),
        (["--tasks", str(tmp_path)], "no task files; expected hellaswag"),
    ):
        result = CliRunner().invoke(main, ["study", model, "-o", str(tmp_path / "s"), *args])
        assert result.exit_code == 2 and message in result.output, result.output
    with pytest.raises(StudyError, match=r"no \.safetensors"):
        Study(StudyConfig(model=tmp_path))
