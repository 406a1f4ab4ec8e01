"""Calibration windows: deterministic by seed, the checkpoint's own tokenizer, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ggq import calib


def test_default_text_is_shipped_byte_exact(shared_data: Path) -> None:
    shipped = calib.default_text().read_bytes()
    assert shipped == (shared_data / "calibration" / calib.DEFAULT_TEXT).read_bytes()


def test_windows_are_deterministic_and_tokenized_like_transformers(checkpoint) -> None:
    from transformers import AutoTokenizer

    ckpt_dir = checkpoint("tied")
    a = calib.sample_windows(ckpt_dir / "tokenizer.json", calib.default_text(), nsamples=8, seqlen=64, seed=3)
    b = calib.sample_windows(ckpt_dir / "tokenizer.json", calib.default_text(), nsamples=8, seqlen=64, seed=3)
    c = calib.sample_windows(ckpt_dir / "tokenizer.json", calib.default_text(), nsamples=8, seqlen=64, seed=4)
    assert a.tokens.shape == (8, 64) and np.array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    ids = AutoTokenizer.from_pretrained(ckpt_dir)(calib.read_text(calib.default_text())).input_ids
    text_ids = np.asarray(ids)
    for row in a.tokens:  # every window is a contiguous run of the text's tokens
        hits = np.flatnonzero(text_ids[: len(text_ids) - 63] == row[0])
        assert any(np.array_equal(text_ids[h : h + 64], row) for h in hits)


def test_short_text_says_what_is_needed(checkpoint, tmp_path: Path) -> None:
    text = tmp_path / "short.txt"
    text.write_text("only a few words here " * 20)
    with pytest.raises(calib.CalibrationError, match=r"needs 65536; use --nsamples \d+ or less"):
        calib.sample_windows(checkpoint("tied") / "tokenizer.json", text, nsamples=128, seqlen=512)


def test_non_utf8_text_names_the_offset(checkpoint, tmp_path: Path) -> None:
    text = tmp_path / "latin1.txt"
    text.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(calib.CalibrationError, match="byte offset 3"):
        calib.sample_windows(checkpoint("tied") / "tokenizer.json", text, nsamples=1, seqlen=2)
