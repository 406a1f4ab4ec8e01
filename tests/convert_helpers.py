"""Conversions the solver tests share: a calibrated file of a fixture, and qwen3-micro's F32 / RTN /
solver trio that the layout, provenance and llama.cpp KLD checks compare."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ggq.checkpoint import Checkpoint
from ggq.convert import CalibOptions, ConvertOptions, convert
from ggq.gguf import read_gguf
from ggq.plan import recipe as rc

SMALL = {"nsamples": 8, "seqlen": 128}  # calibration small enough for a unit test


def solver_gguf(ckpt_dir: Path, out: Path, file_type: str, method: str, **kw: object) -> Path:
    """``ckpt_dir`` converted by ``method`` into ``file_type``; ``kw`` overrides SMALL's calibration."""
    cal = CalibOptions(**{**SMALL, **kw})  # type: ignore[arg-type]
    convert(Checkpoint(ckpt_dir), out, ConvertOptions(rc.RecipeOptions(file_type), method=method, cal=cal))
    return out


def micro_trio(ckpt_dir: Path, folder: Path, method: str, file_type: str) -> dict[str, Path]:
    """F32, llama.cpp's RTN ``file_type`` and ``method``'s ``file_type`` (16 x 256 calibration)."""
    files = {"F32": folder / "f32.gguf", "rtn": folder / "rtn.gguf", method: folder / f"{method}.gguf"}
    convert(Checkpoint(ckpt_dir), files["F32"], ConvertOptions(rc.RecipeOptions("F32")))
    convert(Checkpoint(ckpt_dir), files["rtn"], ConvertOptions(rc.RecipeOptions(file_type)))
    solver_gguf(ckpt_dir, files[method], file_type, method, nsamples=16, seqlen=256)
    return files


def layout(path: Path) -> dict[str, tuple[int, int]]:
    """Each tensor's ggml type and byte size."""
    return {n: (t.type_id, t.nbytes) for n, t in read_gguf(path).tensors.items()}


def check_trio(files: dict[str, Path], method: str) -> set[str]:
    """Asserts that ``method``'s file of ``micro_trio`` has the RTN file's layout and records its
    calibration; returns the names of the tensors whose bytes differ from RTN's."""
    rtn, ours = read_gguf(files["rtn"]), read_gguf(files[method])
    assert layout(files[method]) == layout(files["rtn"])
    meta = ours.metadata
    assert meta["ggq.method"] == method
    assert meta["ggq.calibration.file"] == "gutenberg-train-sample.txt"
    assert (meta["ggq.calibration.nsamples"], meta["ggq.calibration.seqlen"]) == (16, 256)
    assert len(meta["ggq.calibration.sha256"]) == 64
    return {n for n in rtn.tensors if not np.array_equal(rtn.tensor_data(n), ours.tensor_data(n))}
