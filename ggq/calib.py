"""Calibration data: token windows sampled deterministically from a text.

The text is tokenized with the checkpoint's own ``tokenizer.json`` (the Hugging Face tokenizers
library, as transformers would), and ``nsamples`` windows of ``seqlen`` tokens are drawn from
it with a seeded generator, without overlap where the text is long enough.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np


class CalibrationError(ValueError):
    """Calibration text that cannot give the windows asked for; says what is needed."""


DEFAULT_TEXT = "gutenberg-train-sample.txt"


def default_text() -> Path:
    """The public-domain calibration text shipped with ggq (see ggq/data/calibration/README.md)."""
    return Path(str(resources.files("ggq") / "data" / "calibration" / DEFAULT_TEXT))


@dataclass(frozen=True)
class Calibration:
    tokens: np.ndarray  # (nsamples, seqlen) int64
    source: str  # file name
    sha256: str  # of the text file's bytes
    seed: int


def read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{path}: not UTF-8 (byte offset {exc.start})") from exc


def sample_windows(
    tokenizer_json: Path, text_path: Path, nsamples: int = 128, seqlen: int = 512, seed: int = 0
) -> Calibration:
    from tokenizers import Tokenizer

    text = read_text(text_path)
    ids = np.asarray(
        Tokenizer.from_file(str(tokenizer_json)).encode(text, add_special_tokens=False).ids, dtype=np.int64
    )
    need = nsamples * seqlen
    if len(ids) < need:
        fit = len(ids) // seqlen
        raise CalibrationError(
            f"{text_path}: {len(ids)} tokens, but --nsamples {nsamples} x --seqlen {seqlen} needs {need}; "
            f"use --nsamples {fit} or less, or a longer text"
        )
    rng = np.random.default_rng(seed)
    n_windows = len(ids) // seqlen
    # disjoint windows: pick window slots, then a random offset inside the slack
    slots = np.sort(rng.choice(n_windows, size=nsamples, replace=False))
    slack = len(ids) - n_windows * seqlen
    starts = slots * seqlen + int(rng.integers(0, slack + 1))
    tokens = np.stack([ids[s : s + seqlen] for s in starts])  # (nsamples, seqlen)
    digest = hashlib.sha256(text_path.read_bytes()).hexdigest()
    return Calibration(tokens=tokens, source=text_path.name, sha256=digest, seed=seed)
