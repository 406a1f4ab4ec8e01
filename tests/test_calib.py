"""Calibration windows: deterministic by seed, the checkpoint's own tokenizer, clear errors."""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ggq import calib
from ggq.cli import main


def test_default_text_is_shipped_byte_exact() -> None:
    """The shipped calibration text is byte for byte the one its README names by sha256."""
    import hashlib

    shipped = calib.default_text().read_bytes()
    readme = (calib.default_text().parent / "README.md").read_text(encoding="utf-8")
    assert hashlib.sha256(shipped).hexdigest() in readme.replace("\n", "")


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
    """Regression: a text shorter than one window suggested "--nsamples 0 or less"."""
    tokenizer = checkpoint("tied") / "tokenizer.json"
    text = tmp_path / "short.txt"
    text.write_text("only a few words here " * 20)
    with pytest.raises(calib.CalibrationError) as info:
        calib.sample_windows(tokenizer, text, nsamples=128, seqlen=512)
    msg = str(info.value)
    assert re.search(r"the text has \d+ tokens, but --nsamples 128 x --seqlen 512 needs 65536", msg)
    assert "shorter than one window of 512" in msg and "use --nsamples" not in msg
    with pytest.raises(calib.CalibrationError, match=r"use --nsamples (\d+) \(the most that fit\)") as info:
        calib.sample_windows(tokenizer, text, nsamples=128, seqlen=16)
    fit = int(re.search(r"use --nsamples (\d+)", str(info.value)).group(1))  # type: ignore[union-attr]
    assert fit >= 1 and calib.sample_windows(tokenizer, text, nsamples=fit, seqlen=16).tokens.shape == (
        fit,
        16,
    )


def test_calib_dataset_without_the_datasets_package_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(calib.CalibrationError, match="datasets package is not installed") as info:
        calib.dataset_text("wikitext2", 1000)
    assert "use --calib FILE" in str(info.value) and "works offline" in str(info.value)


def _fake_datasets(load: Callable[..., object]) -> types.ModuleType:
    mod = types.ModuleType("datasets")
    mod.load_dataset = load  # type: ignore[attr-defined]
    return mod


def test_calib_dataset_offline_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> object:
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(offline))
    with pytest.raises(
        calib.CalibrationError, match=r"cannot load Salesforce/wikitext \(ConnectionError"
    ) as info:
        calib.dataset_text("wikitext2", 1000)
    assert "use --calib FILE" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(
        calib.CalibrationError, match="--calib-dataset wiki: unknown; known: wikitext2, c4, pile"
    ):
        calib.dataset_text("wiki", 1000)


def test_calib_dataset_windows_come_from_the_records(checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[object, ...]] = []
    records = [{"text": line} for line in calib.read_text(calib.default_text()).split("\n\n")]

    def load(path: str, config: str | None, split: str, data_files: object = None) -> object:
        asked.append((path, config, split, data_files))
        return records

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(load))
    cal = calib.sample_dataset(checkpoint("tied") / "tokenizer.json", "c4", nsamples=4, seqlen=32)
    assert cal.tokens.shape == (4, 32)
    assert cal.source == "c4:allenai/c4/validation" and len(cal.sha256) == 64
    assert asked == [("allenai/c4", None, "validation", {"validation": calib.DATASETS["c4"].data_files})]


def test_convert_calib_dataset_offline_is_one_line(
    checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    out = tmp_path / "x.gguf"
    args = ["convert", str(checkpoint("tied")), "-o", str(out), "--method", "gptq", "--type", "Q8_0"]
    result = CliRunner().invoke(main, [*args, "--calib-dataset", "wikitext2"])
    assert result.exit_code == 2 and "datasets package is not installed" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()
    both = [*args, "--calib-dataset", "c4", "--calib", str(calib.default_text())]
    result = CliRunner().invoke(main, both)
    assert result.exit_code == 2 and "--calib and --calib-dataset: give one of them" in result.output


def test_non_utf8_text_names_the_offset(checkpoint, tmp_path: Path) -> None:
    text = tmp_path / "latin1.txt"
    text.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(calib.CalibrationError, match="byte offset 3"):
        calib.sample_windows(checkpoint("tied") / "tokenizer.json", text, nsamples=1, seqlen=2)
