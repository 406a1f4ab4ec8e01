"""`ggq ppl` against the independent reference: llama.cpp's own llama-perplexity binary, run on
the same file, text, context and batch, prints the same "Final estimate: PPL = X +/- Y"."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ggq import native
from ggq.cli import main
from ggq.eval import llama_tools
from ggq.eval import perplexity as pp
from ggq.gguf import read_gguf
from tests.test_convert import to_gguf

THREADS = 2


def llama_perplexity(
    gguf: Path, text: Path, n_ctx: int, chunks: int, n_batch: int | None = None
) -> tuple[float, float]:
    """llama-perplexity's own "Final estimate" (rerun when its log lost the last lines)."""
    return llama_tools.ppl(gguf, text, n_ctx, chunks, THREADS, n_batch)


def ggq_ppl(gguf: Path, text: Path, n_ctx: int, chunks: int, n_batch: int | None = None) -> dict:
    args = ["ppl", str(gguf), "-f", str(text), "-c", str(n_ctx), "--chunks", str(chunks), "-t", str(THREADS)]
    result = CliRunner().invoke(main, [*args, "--json"] + (["-b", str(n_batch)] if n_batch else []))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["rows"][0]


def assert_same_estimate(ours: dict, ref: tuple[float, float]) -> None:
    """Equal as llama-perplexity prints them (%.4f and %.5f), far tighter than 4 significant digits."""
    assert ours["ppl"] == pytest.approx(ref[0], rel=1e-6, abs=0.6e-4), (ours, ref)
    assert ours["ppl_err"] == pytest.approx(ref[1], rel=1e-5, abs=0.6e-5), (ours, ref)


def set_bool_key(src: Path, dst: Path, key: str, value: bool) -> Path:
    """A copy of a GGUF with one boolean metadata value changed in place (same size and layout)."""
    data = bytearray(src.read_bytes())
    name = key.encode()
    at = data.find(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    assert struct.unpack_from("<I", data, at)[0] == 7  # GGUF_TYPE_BOOL
    data[at + 4] = int(value)
    dst.write_bytes(bytes(data))
    return dst


@pytest.fixture(scope="module")
def tied(checkpoint, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("ppl-tied")
    return {t: to_gguf(checkpoint("tied"), out / f"tied-{t}.gguf", t) for t in ("F32", "Q8_0")}


@pytest.mark.parametrize("file_type", ["F32", "Q8_0"])
def test_fixture_ppl_equals_llama_perplexity(tied: dict[str, Path], prose: Path, file_type: str) -> None:
    """Default batch 2048 at ctx 128: 16 chunks side by side per decode, as llama-perplexity does."""
    ours = ggq_ppl(tied[file_type], prose, 128, 6)
    assert ours["n_chunks"] == 6 and ours["n_seq"] == 16 and ours["n_scored"] == 6 * 63
    assert_same_estimate(ours, llama_perplexity(tied[file_type], prose, 128, 6))


def test_two_models_in_one_table(tied: dict[str, Path], prose: Path) -> None:
    runs = {t: ggq_ppl(tied[t], prose, 128, 3) for t in ("F32", "Q8_0")}
    args = ["ppl", str(tied["F32"]), str(tied["Q8_0"]), "-f", str(prose), "-c", "128", "--chunks", "3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if ".gguf" in line]
    # sorted by file size, smallest first, as llama.cpp users compare quants
    assert len(rows) == 2 and "tied-Q8_0.gguf" in rows[0] and "tied-F32.gguf" in rows[1], result.stdout
    for row, t in zip(rows, ("Q8_0", "F32"), strict=True):
        assert f"{runs[t]['ppl']:.4f}" in row and f"{runs[t]['ppl_err']:.5f}" in row, row


@pytest.mark.parametrize("n_batch", [48, 256])
def test_batch_layouts_equal_llama_perplexity(tied: dict[str, Path], prose: Path, n_batch: int) -> None:
    """48 < ctx: each chunk over three decode calls, the first with no scored position;
    256 = 2 x ctx: chunks in pairs, the last group a single chunk (5 chunks)."""
    ours = ggq_ppl(tied["F32"], prose, 128, 5, n_batch)
    assert ours["n_seq"] == max(1, n_batch // 128)
    assert_same_estimate(ours, llama_perplexity(tied["F32"], prose, 128, 5, n_batch))


def test_bos_replaces_each_chunks_first_token(tied: dict[str, Path], prose: Path, tmp_path: Path) -> None:
    """A model that adds BOS: the text starts with BOS and every chunk's first token becomes BOS."""
    gguf = set_bool_key(tied["F32"], tmp_path / "bos.gguf", "tokenizer.ggml.add_bos_token", True)
    assert native.load().Model(str(gguf)).add_bos
    assert_same_estimate(ggq_ppl(gguf, prose, 128, 4), llama_perplexity(gguf, prose, 128, 4))


def test_special_token_text_is_tokenized_as_plain_text(
    tied: dict[str, Path], prose: Path, tmp_path: Path
) -> None:
    """llama-perplexity tokenizes with parse_special=false: "<|im_start|>" in the text is 5+ tokens."""
    text = prose.read_bytes().replace(b"\n\n", b"\n<|im_start|>user\n<|endoftext|>\n")
    path = tmp_path / "special.txt"
    path.write_bytes(text)
    model = native.load().Model(str(tied["F32"]))
    assert model.tokenize(b"<|im_start|>", add_special=True, parse_special=False).size > 1
    assert_same_estimate(ggq_ppl(tied["F32"], path, 128, 4), llama_perplexity(tied["F32"], path, 128, 4))


def test_qwen3_micro_ppl_equals_llama_perplexity(qwen3_micro: Path, heldout: Path, tmp_path: Path) -> None:
    gguf = to_gguf(qwen3_micro, tmp_path / "micro-f32.gguf")
    text = heldout
    ours = ggq_ppl(gguf, text, 512, 8)
    assert ours["n_seq"] == 4 and ours["n_scored"] == 8 * 255
    assert_same_estimate(ours, llama_perplexity(gguf, text, 512, 8))


def test_nll_kernel_equals_float64_log_softmax() -> None:
    """The vectorised row loop against numpy in float64, on widths with and without a tail of < 8."""
    mod = native.load()
    rng = np.random.default_rng(0)
    for n_vocab in (5, 1024, 16_387, 151_936):
        logits = (rng.standard_normal((7, n_vocab)) * 4).astype(np.float32)  # (rows, vocab)
        logits[0, :] = -1e30  # an extreme row: everything but one logit underflows
        logits[0, 3] = 0.0
        targets = rng.integers(0, n_vocab, 7).astype(np.int32)
        x = logits.astype(np.float64)
        m = x.max(1, keepdims=True)
        ref = (np.log(np.exp(x - m).sum(1)) + m[:, 0]) - x[np.arange(7), targets]
        got = mod.nll_rows(logits, targets, 2)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_nll_kernel_reports_nan_and_checks_its_arguments() -> None:
    mod = native.load()
    logits = np.zeros((3, 100), np.float32)
    logits[1, 50] = np.nan
    logits[2, 7] = np.inf
    got = mod.nll_rows(logits, np.array([0, 1, 2], np.int32), 1)
    assert np.isfinite(got[0]) and np.isnan(got[1]) and np.isnan(got[2])
    with pytest.raises(TypeError, match="expected dtype int32, got int64"):
        mod.nll_rows(logits, np.array([0, 1, 2]), 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        mod.nll_rows(np.zeros((100, 3), np.float32).T, np.array([0, 1, 2], np.int32), 1)
    with pytest.raises(ValueError, match=r"targets\[2\] = 100 is not a token id"):
        mod.nll_rows(logits, np.array([0, 1, 100], np.int32), 1)


def test_evaluator_checks_token_shape(tied: dict[str, Path]) -> None:
    mod = native.load()
    ev = mod.Evaluator(mod.Model(str(tied["F32"])), n_ctx=64, n_batch=128, n_ubatch=128, n_threads=1)
    assert (ev.n_seq, ev.first, ev.n_scored) == (2, 32, 31)
    with pytest.raises(ValueError, match=r"expected shape \(1\.\.2, 64\), got \(3, 64\)"):
        ev.evaluate(np.zeros((3, 64), np.int32))
    with pytest.raises(RuntimeError, match="before evaluate"):
        ev.nll(1)


def test_default_text_is_wikitext2_test_byte_exact() -> None:
    data = pp.DEFAULT_TEXT.read_bytes()
    sha = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
    assert hashlib.sha256(data).hexdigest() == sha and data.count(b"\r\n") == 2891
    assert pp.load_text() == data[:-1]  # llama-perplexity's -f drops one final "\n", not the "\r"


# --- bad input: one line, exit code 2 ---------------------------------------------------------


def ppl_error(*args: str) -> str:
    """The error line of a failed `ggq ppl` (a progress bar may precede errors found mid-run)."""
    result = CliRunner().invoke(main, ["ppl", *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.output
    return errors[0]


def test_not_a_gguf_is_named(tmp_path: Path, prose: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_text("not a model")
    assert "model.gguf: not a GGUF file" in ppl_error(str(bad), "-f", str(prose), "-c", "128")
    assert "cannot read" in ppl_error(str(tmp_path / "missing.gguf"), "-f", str(prose))


def test_truncated_gguf_is_named_before_llama_cpp_reads_it(
    tied: dict[str, Path], prose: Path, tmp_path: Path
) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tied["F32"].read_bytes()[: tied["F32"].stat().st_size // 2])
    assert "beyond the file size" in ppl_error(str(cut), "-f", str(prose), "-c", "128")


def test_gguf_llama_cpp_cannot_load_is_one_line(prose: Path) -> None:
    """A valid GGUF without weights (llama.cpp's vocabulary file): llama.cpp's reason, on one line."""
    vocab_only = native.data_path("vocab", "ggml-vocab-qwen2.gguf")
    message = ppl_error(str(vocab_only), "-f", str(prose), "-c", "128")
    assert "llama.cpp could not load" in message and "token_embd.weight" in message


def test_short_text_says_how_many_tokens_are_needed(tied: dict[str, Path], tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    message = ppl_error(str(tied["F32"]), "-f", str(short), "-c", "128")
    assert re.search(r"short\.txt: \d+ tokens; -c 128 needs at least 256 \(two chunks\)", message), message


def test_non_utf8_text_names_the_byte_offset(tied: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"plain ascii " * 50 + "café".encode("latin-1"))
    assert "latin1.txt: not UTF-8 text (byte 0xe9 at offset 603" in ppl_error(
        str(tied["F32"]), "-f", str(bad)
    )


def test_context_beyond_training_is_refused(tied: dict[str, Path], prose: Path) -> None:
    message = ppl_error(str(tied["F32"]), "-f", str(prose), "-c", "8192")
    assert "-c 8192 exceeds the model's training context (qwen3.context_length = 4096)" in message


def test_nan_logits_are_reported_not_averaged(tied: dict[str, Path], prose: Path, tmp_path: Path) -> None:
    """One NaN in output_norm.weight makes every logit NaN; llama-perplexity would print PPL nan."""
    gguf = tmp_path / "nan.gguf"
    gguf.write_bytes(tied["F32"].read_bytes())
    offset = read_gguf(gguf).tensors["output_norm.weight"].offset
    with gguf.open("r+b") as f:
        f.seek(offset + 4 * 5)
        f.write(struct.pack("<f", float("nan")))
    message = ppl_error(str(gguf), "-f", str(prose), "-c", "128", "--chunks", "2")
    assert "nan.gguf: NaN/Inf logits for 126 of 126 scored tokens in chunks 1-2" in message


def test_model_adding_eos_is_refused(tied: dict[str, Path], prose: Path, tmp_path: Path) -> None:
    gguf = set_bool_key(tied["F32"], tmp_path / "eos.gguf", "tokenizer.ggml.add_eos_token", True)
    assert "adds EOS" in ppl_error(str(gguf), "-f", str(prose), "-c", "128")
