"""Importance matrices against llama.cpp itself: ggq writes llama-imatrix's file byte for byte,
llama-quantize accepts ggq's files and quantizes with exactly the importance ggq wrote."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ggq import calib, ggml, native, qwen3, testing
from ggq.checkpoint import Checkpoint
from ggq.cli import main
from ggq.convert import CalibOptions, ConvertOptions, convert
from ggq.gguf import read_gguf
from ggq.imatrix import ImatrixError, load_imatrix, read_imatrix, save_imatrix
from ggq.plan import recipe as rc

SPEC = replace(testing.WIDE, vocab_size=512, seed=3)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An F32 GGUF whose rows fit 256-blocks, and llama-imatrix's imatrix of it (4 chunks of 128)."""
    d = tmp_path_factory.mktemp("imatrix")
    f32 = d / "f32.gguf"
    ckpt = Checkpoint(testing.build_checkpoint(d / "ckpt", SPEC))
    convert(ckpt, f32, ConvertOptions(rc.RecipeOptions("F32")))
    text = d / "calib.txt"
    text.write_bytes(calib.default_text().read_bytes()[:20000])
    theirs = d / "theirs.gguf"
    cmd = [str(native.tool_path("llama-imatrix")), "-m", str(f32), "-f", str(text), "-o", str(theirs)]
    cmd += ["-c", "128", "--chunks", "4", "-t", "2"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return f32, theirs


def _quantize(f32: Path, imatrix_dir: Path, out: Path) -> Path:
    """llama-quantize Q4_K_M with ``imatrix_dir/imatrix.gguf``, named relatively (its path is
    stored in the output's metadata) so that two runs can be compared byte for byte."""
    cmd = [str(native.tool_path("llama-quantize")), "--imatrix", "imatrix.gguf"]
    cmd += [str(f32), str(out), "Q4_K_M", "2"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300, cwd=imatrix_dir)
    return out


def test_writing_llama_imatrix_content_back_gives_its_file_byte_for_byte(model, tmp_path: Path) -> None:
    _, theirs = model
    im = read_imatrix(theirs)
    assert im.chunk_count == 4 and im.chunk_size == 128 and len(im.datasets) == 1
    entries = {name: (im.sums[name], im.counts[name]) for name in im.sums}
    ours = save_imatrix(tmp_path / "ours.gguf", entries, im.datasets, im.chunk_count, im.chunk_size)
    assert ours.read_bytes() == theirs.read_bytes()


def test_llama_quantize_with_our_file_equals_with_theirs(model, tmp_path: Path) -> None:
    """The importance as load_imatrix reads it, written back (count 1): llama-quantize's output is
    byte-identical to its output with llama-imatrix's own file."""
    f32, theirs = model
    im = read_imatrix(theirs)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "imatrix.gguf").write_bytes(theirs.read_bytes())
    entries = {name: (values, 1) for name, values in load_imatrix(theirs).items()}
    save_imatrix(tmp_path / "b" / "imatrix.gguf", entries, im.datasets, im.chunk_count, im.chunk_size)
    ref = _quantize(f32, tmp_path / "a", tmp_path / "ref.gguf")
    ours = _quantize(f32, tmp_path / "b", tmp_path / "ours.gguf")
    assert ours.read_bytes() == ref.read_bytes()
    for name, values in load_imatrix(tmp_path / "b" / "imatrix.gguf").items():
        assert np.array_equal(values, load_imatrix(theirs)[name])


def test_imatrix_from_hessians_is_what_llama_quantize_uses(model, tmp_path: Path) -> None:
    """Entries from GPTQ Hessians (diag = sum of x^2, count = tokens): llama-quantize's tensors
    equal ggml's encoder with importance diag(H) / tokens, and differ from plain RTN."""
    f32, _ = model
    gg = read_gguf(f32)
    rng = np.random.default_rng(0)
    tokens = 300
    entries = {}
    attention = ("_q.weight", "_k.weight", "_v.weight", "_output.weight")
    for name, info in gg.tensors.items():
        if name.startswith("blk.") and name.endswith(attention):
            n_in = info.shape[0]
            x = rng.standard_normal((tokens, n_in)) * rng.uniform(0.1, 5, n_in)  # (tokens, n_in)
            entries[name] = (np.diag(x.T @ x).astype(np.float32), tokens)  # a GPTQ Hessian's diagonal
    (tmp_path / "im").mkdir()
    save_imatrix(tmp_path / "im" / "imatrix.gguf", entries, ["synthetic"], 3, 100)
    out = read_gguf(_quantize(f32, tmp_path / "im", tmp_path / "q.gguf"))
    assert out.metadata["quantize.imatrix.dataset"] == "synthetic"
    assert out.metadata["quantize.imatrix.entries_count"] == len(entries)
    by_id = {fmt.type_id: fmt.name for fmt in ggml.FORMATS.values()}
    for name, (sums, count) in entries.items():
        w = np.array(gg.tensor_f32(name))  # (rows, n_per_row)
        type_name = by_id[out.tensors[name].type_id]
        data = np.asarray(out.tensor_data(name)).reshape(w.shape[0], -1)
        assert np.array_equal(data, ggml.quantize(w, type_name, sums / np.float32(count))), name
        assert not np.array_equal(data, ggml.quantize(w, type_name)), name


def test_experts_round_trip(tmp_path: Path) -> None:
    name = "blk.0.ffn_down_exps.weight"
    sums = np.abs(np.random.default_rng(1).standard_normal((3, 64))).astype(np.float32)  # (n_expert, n_in)
    path = save_imatrix(tmp_path / "e.gguf", {name: (sums, np.array([5, 0, 2]))}, [], 1, 7)
    im = read_imatrix(path)
    assert np.array_equal(im.sums[name], sums) and list(im.counts[name]) == [5, 0, 2]
    want = np.stack([sums[0] / np.float32(5), np.ones(64, np.float32), sums[2] / np.float32(2)])
    assert np.array_equal(load_imatrix(path)[name], want)  # an expert that saw no token weighs 1


def test_bad_entries_are_named(tmp_path: Path) -> None:
    with pytest.raises(ImatrixError, match=r"w: sums of shape \(2, 8\) do not match 3 count"):
        save_imatrix(tmp_path / "x.gguf", {"w": (np.ones((2, 8)), np.array([1, 2, 3]))}, [], 1, 1)
    with pytest.raises(ImatrixError, match="w: sums and counts must be finite and non-negative"):
        save_imatrix(tmp_path / "x.gguf", {"w": (np.array([1.0, np.nan]), 4)}, [], 1, 1)
    with pytest.raises(ImatrixError, match="no entries"):
        save_imatrix(tmp_path / "x.gguf", {}, [], 1, 1)
    assert not (tmp_path / "x.gguf").exists()


CAL = CalibOptions(nsamples=4, seqlen=64)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A checkpoint, its F32 GGUF, and the imatrix files ``ggq convert --save-imatrix`` writes
    with gptq and awq (4 windows of 64 tokens)."""
    d = tmp_path_factory.mktemp("saved")
    ckpt_dir = testing.build_checkpoint(d / "ckpt", SPEC)
    files = {"ckpt": ckpt_dir, "F32": d / "f32.gguf"}
    convert(Checkpoint(ckpt_dir), files["F32"], ConvertOptions(rc.RecipeOptions("F32")))
    for method in ("gptq", "awq"):
        files[method] = d / f"{method}.imatrix.gguf"
        opts = ConvertOptions(rc.RecipeOptions("Q4_0"), method=method, cal=CAL, save_imatrix=files[method])
        convert(Checkpoint(ckpt_dir), d / f"{method}.gguf", opts)
    return files


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_saved_imatrix_has_every_linear_and_llama_quantize_takes_it(
    calibrated: dict[str, Path], method: str, tmp_path: Path
) -> None:
    im = read_imatrix(calibrated[method])
    assert (im.datasets, im.chunk_count, im.chunk_size) == ([calib.DEFAULT_TEXT], 4, 64)
    gg = read_gguf(calibrated["F32"])
    linears = {n: t.shape[0] for n, t in gg.tensors.items() if n.startswith("blk.") and len(t.shape) == 2}
    values = load_imatrix(calibrated[method])
    assert {n: len(v) for n, v in values.items()} == linears  # (n_in,) per linear
    assert all(int(im.counts[n][0]) == 4 * 64 for n in linears)
    assert all(np.all(v > 0) for v in values.values())
    (tmp_path / "im").mkdir()
    (tmp_path / "im" / "imatrix.gguf").write_bytes(calibrated[method].read_bytes())
    out = read_gguf(_quantize(calibrated["F32"], tmp_path / "im", tmp_path / "q.gguf"))
    assert out.metadata["quantize.imatrix.entries_count"] == len(linears)


def test_saved_imatrix_of_gptq_is_the_first_layers_input_energy(calibrated: dict[str, Path]) -> None:
    """blk.0's q/k/v read the normed embeddings of the calibration windows: the entry is
    diag(X^T X) / tokens, computed here from ggq.qwen3 independently of the solver."""
    ckpt = Checkpoint(calibrated["ckpt"])
    windows = calib.sample_windows(calibrated["ckpt"] / "tokenizer.json", calib.default_text(), 4, 64, 0)
    w = qwen3.load_layer(ckpt, 0)
    with torch.no_grad():
        x = qwen3.attention_input(qwen3.embed(ckpt, torch.from_numpy(windows.tokens)), w, ckpt.hparams)
    flat = x.reshape(-1, x.shape[-1]).to(torch.float64).numpy()  # (tokens, n_embd)
    want = np.diag(flat.T @ flat) / flat.shape[0]
    values = load_imatrix(calibrated["gptq"])
    for name in ("attn_q", "attn_k", "attn_v"):
        np.testing.assert_allclose(values[f"blk.0.{name}.weight"], want, rtol=1e-5)
    assert not np.allclose(values["blk.0.ffn_up.weight"], values["blk.1.ffn_up.weight"], rtol=1e-2)


def test_save_imatrix_needs_a_calibrated_method(calibrated: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    args = ["convert", str(calibrated["ckpt"]), "-o", str(out), "--save-imatrix", str(tmp_path / "i.gguf")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "--save-imatrix: needs calibration activations" in result.output
    assert not out.exists()
