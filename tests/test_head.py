"""The output head solved on the calibration (solvers/head.py), and the writer's deferred tensor
that lets the first tensor of the file (a tied token_embd) be written after the last layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ggq import calib, ggml
from ggq.checkpoint import Checkpoint
from ggq.convert import CalibOptions, ConvertOptions, convert
from ggq.gguf import read_gguf
from ggq.gguf.writer import GGUFWriter, WriterError
from ggq.plan import recipe as rc
from tests import ggml_ref
from tests.convert_helpers import SMALL, solver_gguf


def _final_inputs(ckpt_dir: Path) -> np.ndarray:
    """The head's input (the final normed hidden state) of the float model on the calibration
    windows a SMALL convert samples, by transformers' Qwen3."""
    from transformers import AutoModelForCausalLM

    win = calib.sample_windows(
        ckpt_dir / "tokenizer.json", calib.default_text(), SMALL["nsamples"], SMALL["seqlen"]
    )
    model = AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32)
    with torch.no_grad():
        out = model.model(input_ids=torch.from_numpy(win.tokens))
    return out.last_hidden_state.reshape(-1, model.config.hidden_size).numpy().astype(np.float64)


def _head_error(path: Path, name: str, w: np.ndarray, x: np.ndarray) -> float:
    """||X (W - deq)^T||^2 / ||X W^T||^2 of tensor ``name``, decoded by ggml itself."""
    f = read_gguf(path)
    data = np.array(f.tensor_data(name)).reshape(w.shape[0], -1)
    deq = ggml_ref.dequantize(data, f.tensors[name].type_id, w.shape[1]).astype(np.float64)
    return float(np.sum((x @ (w - deq).T) ** 2) / np.sum((x @ w.T) ** 2))


@pytest.mark.parametrize(("variant", "head"), [("tied", "token_embd.weight"), ("untied", "output.weight")])
def test_the_head_is_solved_on_its_input(checkpoint, tmp_path: Path, variant: str, head: str) -> None:
    """GPTQ's head has a lower output error on its calibration input than the writer's RTN, and
    AWQ's importance-weighted one too (measured 0.75-0.79x and 0.90x); the untied file's token_embd stays the writer's RTN."""
    ckpt_dir = checkpoint(variant)
    opts = rc.RecipeOptions("Q4_0", pure=True)
    rtn = tmp_path / "rtn.gguf"
    convert(Checkpoint(ckpt_dir), rtn, ConvertOptions(opts))
    x = _final_inputs(ckpt_dir)
    w = Checkpoint(ckpt_dir).load(head).astype(np.float64)
    err = {"rtn": _head_error(rtn, head, w, x)}
    for m in ("gptq", "awq"):
        out = tmp_path / f"{m}.gguf"
        convert(Checkpoint(ckpt_dir), out, ConvertOptions(opts, method=m, cal=_small()))
        err[m] = _head_error(out, head, w, x)
        if head == "output.weight":
            assert (
                read_gguf(out).tensor_data("token_embd.weight").tobytes()
                == read_gguf(rtn).tensor_data("token_embd.weight").tobytes()
            )
    assert err["gptq"] < 0.85 * err["rtn"], err
    assert err["awq"] < 0.95 * err["rtn"], err


def _small() -> CalibOptions:
    return CalibOptions(**SMALL)  # type: ignore[arg-type]


def test_a_float_head_is_left_to_the_writer(checkpoint, tmp_path: Path) -> None:
    """--token-embedding-type F16 on a tied model: nothing to solve, the file as RTN writes it."""
    ckpt_dir = checkpoint("tied")
    a = solver_gguf(ckpt_dir, tmp_path / "a.gguf", "Q8_0", "gptq")
    assert read_gguf(a).tensors["token_embd.weight"].type_id != ggml.GGML_TYPES["F16"].type_id
    opts = rc.RecipeOptions("Q8_0", token_embedding_type="F16")
    b, r = tmp_path / "b.gguf", tmp_path / "r.gguf"
    convert(Checkpoint(ckpt_dir), b, ConvertOptions(opts, method="gptq", cal=_small()))
    convert(Checkpoint(ckpt_dir), r, ConvertOptions(opts))
    assert (
        read_gguf(b).tensor_data("token_embd.weight").tobytes()
        == read_gguf(r).tensor_data("token_embd.weight").tobytes()
    )


def _three(path: Path) -> GGUFWriter:
    w = GGUFWriter(path)
    w.add_kv("general.architecture", "test")
    for name, n in (("a", 40), ("b", 8), ("c", 24)):
        w.add_tensor_info(name, (n,), 0, 4 * n)  # F32
    w.begin_data()
    return w


def test_a_deferred_tensor_is_filled_in_its_place(tmp_path: Path) -> None:
    """Deferring the first and the last tensor and filling them at the end gives the bytes of
    writing them in order (read back by gguf-py, llama.cpp's reader)."""
    from gguf import GGUFReader

    data = {
        k: np.arange(n, dtype=np.float32) + i for i, (k, n) in enumerate((("a", 40), ("b", 8), ("c", 24)))
    }
    w = _three(tmp_path / "inorder.gguf")
    for k, v in data.items():
        w.write_tensor(k, v)
    w.finish()
    w = _three(tmp_path / "deferred.gguf")
    w.defer_tensor("a")
    w.write_tensor("b", data["b"])
    w.defer_tensor("c")
    w.fill_tensor("c", data["c"])
    w.fill_tensor("a", data["a"])
    w.finish()
    assert (tmp_path / "deferred.gguf").read_bytes() == (tmp_path / "inorder.gguf").read_bytes()
    got = {t.name: np.array(t.data) for t in GGUFReader(tmp_path / "deferred.gguf").tensors}
    assert all(np.array_equal(got[k], v) for k, v in data.items())


def test_an_unfilled_or_wrong_fill_is_refused_and_leaves_no_file(tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    w = _three(out)
    w.defer_tensor("a")
    with pytest.raises(WriterError, match="'b' was not deferred"):
        w.fill_tensor("b", np.zeros(8, np.float32))
    with pytest.raises(WriterError, match="'a' is 4 bytes, its info says 160"):
        w.fill_tensor("a", np.zeros(1, np.float32))
    w.write_tensor("b", np.zeros(8, np.float32))
    w.write_tensor("c", np.zeros(24, np.float32))
    with pytest.raises(WriterError, match="before filling tensor 'a'"):
        w.finish()
    w.abort()
    assert not out.exists() and not list(tmp_path.glob("*.part"))
