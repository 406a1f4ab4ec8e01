"""`ggq study`: every (method, bits) converted and judged against the base, llama.cpp's own quants
beside them, cached under a key of everything that makes each file and number, so that a re-run
does only what is missing and a changed option or changed code redoes what it touches. (Zero-shot
tasks: tests/test_tasks.py.)"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ggq import study
from ggq.cli import main
from ggq.convert import CalibOptions, ConvertOptions
from ggq.eval import llama_tools
from ggq.plan.recipe import RecipeOptions
from ggq.solvers.options import DistillOptions
from ggq.study import Study, StudyConfig, StudyError


def run_study(model: Path, out: Path, prose: Path, *extra: str) -> tuple[dict, str]:
    args = ["study", str(model), "--methods", "rtn,awq", "--bits", "4", "-f", str(prose), "-c", "128"]
    args += ["--chunks", "4", "--nsamples", "4", "--seqlen", "64", "-o", str(out), *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return json.loads((out / "study.json").read_text()), result.output


def test_study_end_to_end_and_resumable(
    checkpoint, prose: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
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

    # a changed solver option redoes the files it shapes and their results, nothing else (rtn,
    # and so the base, reads no calibration)
    _, log4 = run_study(model, out, prose, "--methods", "rtn,gptq", "--seed", "1", "--no-reference")
    assert "--method gptq" in log4 and "--method rtn" not in log4 and "(base)" not in log4
    assert "1 file(s) in one pass" in log4
    # changed ggq code (the same __version__) redoes every file and result; raising=False: on code
    # that never asks for the digest the patch changes nothing, and the test fails below
    monkeypatch.setattr(study, "source_digest", lambda: "edited", raising=False)
    _, log5 = run_study(model, out, prose, "--methods", "rtn", "--no-reference")
    assert "(base)" in log5 and "--method rtn" in log5 and "1 file(s) in one pass" in log5
    _, log6 = run_study(model, out, prose, "--methods", "rtn", "--no-reference")
    assert "convert" not in log6 and "ggq ppl" not in log6
    # so does another llama.cpp build
    monkeypatch.setattr(study, "llama_cpp_build", lambda: "0000000 CUDA", raising=False)
    _, log7 = run_study(model, out, prose, "--methods", "rtn", "--no-reference")
    assert "(base)" in log7 and "--method rtn" in log7 and "1 file(s) in one pass" in log7


def test_conversion_key_holds_every_option(tmp_path: Path) -> None:
    """Each option of ConvertOptions that shapes the bytes changes the key; those that do not
    (threads, save_imatrix; the calibration options for rtn) leave it. A new option fails the
    field lists until it is keyed and listed here."""
    imatrix = tmp_path / "a.imatrix"
    imatrix.write_bytes(b"one")
    cal_changes = {"nsamples": 8, "seqlen": 64, "seed": 1, "damp": 0.1, "act_order": True, "dataset": "x"}
    recipe_changes = {
        "file_type": "Q4_0",
        "pure": True,
        "tensor_types": (("ffn_down", "Q8_0"),),
        "output_tensor_type": "Q8_0",
        "token_embedding_type": "Q8_0",
        "leave_output_tensor": True,
        "has_imatrix": True,
    }
    # calib is keyed by its content (the calib_sha argument), device as resolved (below); not max_memory
    cal_fields = {f.name for f in dataclasses.fields(CalibOptions)}
    assert cal_fields == {*cal_changes, "calib", "device", "max_memory"}
    assert {f.name for f in dataclasses.fields(RecipeOptions)} == set(recipe_changes)
    fields = {
        "recipe",
        "method",
        "imatrix",
        "threads",
        "cal",
        "save_imatrix",
        "tensor_overrides",
        "plan_kv",
        "distill",
    }
    assert {f.name for f in dataclasses.fields(ConvertOptions)} == fields

    def key(opts: ConvertOptions, calib_sha: str = "c", code: str = "s", llama: str = "l") -> str:
        return study.conversion_key(opts, "model", calib_sha, code, llama)

    gptq = ConvertOptions(method="gptq", cal=CalibOptions(calib=tmp_path / "calib.txt"))
    k = key(gptq)
    variants = [
        dataclasses.replace(gptq, cal=dataclasses.replace(gptq.cal, **{n: v})) for n, v in cal_changes.items()
    ]
    variants += [
        dataclasses.replace(gptq, recipe=dataclasses.replace(gptq.recipe, **{n: v}))
        for n, v in recipe_changes.items()
    ]
    variants += [dataclasses.replace(gptq, method="awq"), dataclasses.replace(gptq, imatrix=imatrix)]
    variants += [
        dataclasses.replace(gptq, tensor_overrides=(("blk.0.ffn_down.weight", "Q6_K"),)),
        dataclasses.replace(gptq, plan_kv=(("budget_bytes", 1000),)),
        dataclasses.replace(gptq, distill=DistillOptions(steps=10)),
        dataclasses.replace(gptq, distill=DistillOptions(steps=10, lr=0.05)),
    ]
    keys = [key(v) for v in variants] + [key(gptq, calib_sha="d"), key(gptq, code="t"), key(gptq, llama="m")]
    assert len({k, *keys}) == len(keys) + 1
    same = [
        dataclasses.replace(gptq, threads=1),
        dataclasses.replace(gptq, save_imatrix=tmp_path / "out.imatrix"),
        dataclasses.replace(gptq, cal=dataclasses.replace(gptq.cal, calib=tmp_path / "renamed.txt")),
        dataclasses.replace(gptq, cal=dataclasses.replace(gptq.cal, max_memory=1 << 30)),
    ]
    assert {key(v) for v in same} == {k}
    with_imatrix = dataclasses.replace(gptq, imatrix=imatrix)
    before = key(with_imatrix)
    imatrix.write_bytes(b"two")  # the imatrix is keyed by content
    assert key(with_imatrix) != before
    rtn = ConvertOptions(cal=CalibOptions(seed=0))
    assert key(rtn) == key(dataclasses.replace(rtn, cal=CalibOptions(seed=1, nsamples=3)), calib_sha="d")


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
