"""Calibration data: token windows sampled deterministically from a text.

The text is tokenized with the checkpoint's own ``tokenizer.json`` (the Hugging Face tokenizers
library, as transformers would), and ``nsamples`` windows of ``seqlen`` tokens are drawn from
it with a seeded generator, without overlap where the text is long enough.

Instead of a file, a named public data set (``--calib-dataset``) can be read through the
``datasets`` package when it is installed and online; ggq does not depend on it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ggq.errors import GGQError


class CalibrationError(GGQError, ValueError):
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


UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def read_bytes(path: Path) -> bytes:
    """The file's bytes, or one line saying why a path cannot be read as a file."""
    if path.is_dir():
        raise CalibrationError(f"{path}: a directory, not a text file")
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise CalibrationError(f"{path}: not found") from exc
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def decode_text(path: Path, data: bytes) -> str:
    """UTF-8 text that can serve as calibration text; anything else is named before any work
    (an image or NUL-padded file would otherwise tokenize into windows of byte tokens)."""
    if not data:
        raise CalibrationError(f"{path}: empty file, no calibration text")
    if data.startswith(UTF16_BOMS):
        raise CalibrationError(f"{path}: UTF-16 text (byte order mark); calibration text must be UTF-8")
    nul = data.find(b"\0")
    if nul >= 0:
        raise CalibrationError(f"{path}: binary data, not text (NUL byte at offset {nul})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(
            f"{path}: not UTF-8 (byte offset {exc.start}: 0x{data[exc.start]:02x}); re-encode the text as UTF-8"
        ) from exc
    if not text.strip():
        raise CalibrationError(f"{path}: only whitespace, no calibration text")
    return text


def read_text(path: Path) -> str:
    """A calibration text file, checked (see decode_text)."""
    return decode_text(path, read_bytes(path))


@dataclass(frozen=True)
class NamedDataset:
    """A split of a Hugging Face data set, as ``datasets.load_dataset`` names it."""

    path: str
    config: str | None
    split: str
    data_files: str | None = None  # one shard of a large set
    field: str = "text"


DATASETS = {
    "wikitext2": NamedDataset("Salesforce/wikitext", "wikitext-2-raw-v1", "train"),
    "c4": NamedDataset("allenai/c4", None, "validation", "en/c4-validation.00000-of-00008.json.gz"),
    "pile": NamedDataset("mit-han-lab/pile-val-backup", None, "validation"),
}
OFFLINE_HINT = "use --calib FILE instead (the default, the text shipped with ggq, works offline)"
CHARS_PER_TOKEN = 16  # text read from a data set: a generous bound on characters per token


def check_dataset(name: str) -> NamedDataset:
    if name not in DATASETS:
        raise CalibrationError(f"--calib-dataset {name}: unknown; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def dataset_text(name: str, max_chars: int) -> str:
    """The first records of the named data set, joined by blank lines up to ``max_chars``."""
    spec = check_dataset(name)
    try:
        import datasets
    except ImportError as exc:
        raise CalibrationError(
            f"--calib-dataset {name}: the datasets package is not installed (pip install datasets); "
            + OFFLINE_HINT
        ) from exc
    files = {spec.split: spec.data_files} if spec.data_files else None
    try:
        records = datasets.load_dataset(spec.path, spec.config, split=spec.split, data_files=files)
    except (OSError, ValueError) as exc:  # offline, hub unreachable, set or split not found
        reason = " ".join(str(exc).split())  # one line
        raise CalibrationError(
            f"--calib-dataset {name}: cannot load {spec.path} ({type(exc).__name__}: {reason}); "
            + OFFLINE_HINT
        ) from exc
    parts, size = [], 0
    for record in records:
        parts.append(str(record[spec.field]))
        size += len(parts[-1]) + 2
        if size >= max_chars:
            break
    return "\n\n".join(parts)


def sample_windows(
    tokenizer_json: Path, text_path: Path, nsamples: int = 128, seqlen: int = 512, seed: int = 0
) -> Calibration:
    data = read_bytes(text_path)
    text = decode_text(text_path, data)
    digest = hashlib.sha256(data).hexdigest()
    return sample_text(tokenizer_json, text, str(text_path), text_path.name, digest, nsamples, seqlen, seed)


def sample_dataset(
    tokenizer_json: Path, name: str, nsamples: int = 128, seqlen: int = 512, seed: int = 0
) -> Calibration:
    """Windows from ``--calib-dataset name`` (recorded as ``name:path/config/split``)."""
    spec = check_dataset(name)
    text = dataset_text(name, nsamples * seqlen * CHARS_PER_TOKEN)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    source = f"{name}:{'/'.join(p for p in (spec.path, spec.config, spec.split) if p)}"
    return sample_text(
        tokenizer_json, text, f"--calib-dataset {name}", source, digest, nsamples, seqlen, seed
    )


def _too_short(where: str, n_tokens: int, nsamples: int, seqlen: int) -> CalibrationError:
    need = nsamples * seqlen
    fit = n_tokens // seqlen
    msg = f"{where}: the text has {n_tokens} tokens, but --nsamples {nsamples} x --seqlen {seqlen} needs {need}; "
    if fit >= 1:
        return CalibrationError(msg + f"use --nsamples {fit} (the most that fit) or a longer text")
    return CalibrationError(
        msg + f"it is shorter than one window of {seqlen}: use a longer text or a lower --seqlen"
    )


def sample_text(
    tokenizer_json: Path,
    text: str,
    where: str,
    source: str,
    digest: str,
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
) -> Calibration:
    """``nsamples`` windows of ``seqlen`` tokens of ``text`` (named ``where`` in errors, recorded
    as ``source`` with sha256 ``digest``)."""
    from tokenizers import Tokenizer

    ids = np.asarray(
        Tokenizer.from_file(str(tokenizer_json)).encode(text, add_special_tokens=False).ids, dtype=np.int64
    )
    if len(ids) < nsamples * seqlen:
        raise _too_short(where, len(ids), nsamples, seqlen)
    rng = np.random.default_rng(seed)
    n_windows = len(ids) // seqlen
    # disjoint windows: pick window slots, then a random offset inside the slack
    slots = np.sort(rng.choice(n_windows, size=nsamples, replace=False))
    slack = len(ids) - n_windows * seqlen
    starts = slots * seqlen + int(rng.integers(0, slack + 1))
    tokens = np.stack([ids[s : s + seqlen] for s in starts])  # (nsamples, seqlen)
    return Calibration(tokens=tokens, source=source, sha256=digest, seed=seed)
