"""The Q4_0 that llama.cpp's own quantizer makes: the baseline every ggq quant is compared with.

Built from a float (F32/F16/BF16) GGUF through ``llama_model_quantize`` (what ``llama-quantize
BASE OUT Q4_0`` runs, default parameters, no importance matrix) in the linked llama.cpp, and
cached by the base file's content hash and the llama.cpp commit, so a second ``--vs-q4_0`` run
costs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from ggq import ggml, native
from ggq.eval.perplexity import PerplexityError
from ggq.files import atomic_write, sha256_file, short_hash
from ggq.gguf import GGUFFormatError, read_gguf
from ggq.plan import recipe as rc

FLOAT_FILE_TYPES = {rc.FILE_TYPES[t].llama_ftype: t for t in ggml.FLOAT_TYPES}


def cache_dir() -> Path:
    """$GGQ_CACHE, else $XDG_CACHE_HOME/ggq, else ~/.cache/ggq."""
    if os.environ.get("GGQ_CACHE"):
        return Path(os.environ["GGQ_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ggq"


def check_float_base(path: Path) -> str:
    """The base's file type name; a quantized base cannot make a fair baseline."""
    try:
        ftype = read_gguf(path).metadata.get("general.file_type", 0)
    except GGUFFormatError as exc:
        raise PerplexityError(str(exc)) from exc
    if ftype not in FLOAT_FILE_TYPES:
        raise PerplexityError(
            f"{path}: --vs-q4_0 needs a F32, F16 or BF16 base to quantize (general.file_type = {ftype})"
        )
    return FLOAT_FILE_TYPES[ftype]


def q4_0_baseline(base: Path, n_threads: int = 0, cache: Path | None = None) -> Path:
    """Path of llama.cpp's Q4_0 of ``base``, made on first use (atomically) and cached."""
    check_float_base(base)
    mod = native.load()
    key = short_hash(f"{sha256_file(base)}:{mod.LLAMA_CPP_COMMIT}:Q4_0", 20)
    folder = (cache or cache_dir()) / "baselines"
    out = folder / f"{base.stem}-{key}-llama.cpp-Q4_0.gguf"
    if out.is_file():
        return out
    try:
        with atomic_write(out, f".{os.getpid()}.tmp") as tmp:  # processes may share the cache
            mod.quantize(str(base), str(tmp), rc.FILE_TYPES["Q4_0"].llama_ftype, n_threads)
    except mod.LlamaError as exc:
        raise PerplexityError(str(exc)) from exc
    return out
