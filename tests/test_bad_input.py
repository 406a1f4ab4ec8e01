"""Bad input is refused before any work: one line naming the culprit, exit code 2, no file.

Each case is what a hostile (or unlucky) user hands the command line: a checkpoint whose
config.json disagrees with its weights, calibration text that cannot serve, numbers that make
no sense. The bad checkpoints are copies of the tied fixture with config.json rewritten or one
tensor re-saved through safetensors, so every case differs from a good checkpoint in one thing.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import load_file, save_file

from ggq import calib
from ggq.cli import main

# -- helpers --------------------------------------------------------------------------------


def _copy(checkpoint: Callable[[str], Path], tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(checkpoint("tied"), d)
    return d


def _config(d: Path, **changes: Any) -> None:
    """Rewrite config.json with ``changes`` (a value of None deletes the key)."""
    cfg = json.loads((d / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg, indent=2))


def _weights(d: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Re-save model.safetensors after ``edit`` changed the dict of tensors in place."""
    tensors = load_file(str(d / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def _invoke(args: list[str]) -> Result:
    return CliRunner().invoke(main, args)


def _assert_one_line_error(result: Result, expected: str) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [f"Error: {expected}"]


def _assert_empty(folder: Path) -> None:
    """Nothing under the final name and no temporary ``.part`` file either."""
    assert sorted(p.name for p in folder.iterdir()) == []


def _set(name: str, tensor: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda w: w.__setitem__(name, tensor)


def _drop(name: str) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda w: w.__delitem__(name)


Q = "model.layers.0.self_attn.q_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"
ATTN_DIMS = "(num_attention_heads*head_dim, hidden_size)"

# (id, config changes, weight edit, expected message with {st} = model.safetensors,
#  {cfg} = config.json, {d} = the checkpoint folder)
CHECKPOINT_CASES: list[tuple[str, dict[str, Any], Any, str]] = [
    (
        "tensor-shape",
        {},
        _set(Q, torch.zeros(48, 64, dtype=torch.bfloat16)),
        f"{{st}}: tensor {Q} has shape (48, 64), but {{cfg}} expects (64, 64) = {ATTN_DIMS}",
    ),
    (
        "transposed",
        {},
        _set(DOWN, torch.zeros(128, 64, dtype=torch.bfloat16)),
        f"{{st}}: tensor {DOWN} has shape (128, 64), but {{cfg}} expects (64, 128) "
        "= (hidden_size, intermediate_size)",
    ),
    (
        "num-attention-heads",
        {"num_attention_heads": 8},
        None,
        f"{{st}}: tensor {Q} has shape (64, 64), but {{cfg}} expects (128, 64) = {ATTN_DIMS}",
    ),
    (
        "num-key-value-heads",
        {"num_key_value_heads": 1},
        None,
        "{st}: tensor model.layers.0.self_attn.k_proj.weight has shape (32, 64), but {cfg} expects "
        "(16, 64) = (num_key_value_heads*head_dim, hidden_size)",
    ),
    (
        "head-dim",
        {"head_dim": 8},
        None,
        f"{{st}}: tensor {Q} has shape (64, 64), but {{cfg}} expects (32, 64) = {ATTN_DIMS}",
    ),
    (
        "intermediate-size",
        {"intermediate_size": 256},
        None,
        "{st}: tensor model.layers.0.mlp.gate_proj.weight has shape (128, 64), but {cfg} expects "
        "(256, 64) = (intermediate_size, hidden_size)",
    ),
    (
        "vocab-rows",
        {"vocab_size": 2048},
        None,
        "{st}: tensor model.embed_tokens.weight has shape (1024, 64), but {cfg} expects (2048, 64) "
        "= (vocab_size, hidden_size)",
    ),
    (
        "more-layers-than-weights",
        {"num_hidden_layers": 3},
        None,
        "{d}: config.json has num_hidden_layers 3, but the weights have no tensors of layer 2 "
        "(model.layers.2.*)",
    ),
    (  # llama.cpp's converter refuses a tensor it cannot map; so does ggq, rather than drop a layer
        "layer-beyond-num-hidden-layers",
        {"num_hidden_layers": 1},
        None,
        "{st}: tensor model.layers.1.input_layernorm.weight is in layer 1, but {cfg} has num_hidden_layers 1",
    ),
    (
        "missing-tensor",
        {},
        _drop("model.layers.1.self_attn.k_norm.weight"),
        "{d}: missing tensor model.layers.1.self_attn.k_norm.weight",
    ),
    (
        "untied-without-lm-head",
        {"tie_word_embeddings": False},
        None,
        "{d}: missing tensor lm_head.weight (tie_word_embeddings is false)",
    ),
    (
        "zero-heads",
        {"num_attention_heads": 0, "head_dim": None},
        None,
        "{cfg}: num_attention_heads is 0; expected a positive integer",
    ),
    (
        "negative-size",
        {"intermediate_size": -128},
        None,
        "{cfg}: intermediate_size is -128; expected a positive integer",
    ),
    (
        "heads-not-a-multiple-of-kv-heads",
        {"num_key_value_heads": 3},
        None,
        "{cfg}: num_attention_heads 4 is not a multiple of num_key_value_heads 3",
    ),
    (
        "unsupported-dtype",
        {},
        _set("model.norm.weight", torch.ones(64, dtype=torch.float64)),
        "{st}: tensor model.norm.weight has dtype F64; supported: BF16, F16, F32",
    ),
    (
        "unexpected-tensor",
        {},
        _set("model.layers.0.mlp.extra_proj.weight", torch.zeros(4, 4, dtype=torch.bfloat16)),
        "{st}: unexpected tensor model.layers.0.mlp.extra_proj.weight for Qwen3ForCausalLM",
    ),
]


@pytest.mark.parametrize(
    ("changes", "edit", "message"),
    [pytest.param(c, e, m, id=i) for i, c, e, m in CHECKPOINT_CASES],
)
def test_checkpoint_that_disagrees_with_its_config_is_refused(
    checkpoint, tmp_path: Path, changes: dict[str, Any], edit: Any, message: str
) -> None:
    """Regression: such a checkpoint was converted and written (exit 0), and llama.cpp refused the
    file; now it is named when the checkpoint is opened, before the plan, for --dry-run too."""
    d = _copy(checkpoint, tmp_path)
    _config(d, **changes)
    if edit is not None:
        _weights(d, edit)
    expected = message.format(st=d / "model.safetensors", cfg=d / "config.json", d=d)
    out = tmp_path / "out"
    out.mkdir()
    for extra in ([], ["--dry-run"], ["--method", "gptq", "--nsamples", "2", "--seqlen", "16"]):
        result = _invoke(["convert", str(d), "--type", "Q8_0", "-o", str(out / "x.gguf"), *extra])
        _assert_one_line_error(result, expected)
        _assert_empty(out)


def test_tokenizer_larger_than_the_embedding_is_refused(checkpoint, tmp_path: Path) -> None:
    """Token ids with no embedding row: config and weights agree on 512 rows, the tokenizer has
    1,024 ids. Regression: an IndexError traceback while writing the GGUF vocabulary."""
    d = _copy(checkpoint, tmp_path)
    _config(d, vocab_size=512)
    _weights(d, lambda w: w.__setitem__("model.embed_tokens.weight", w["model.embed_tokens.weight"][:512]))
    tok = json.loads((d / "tokenizer.json").read_text())
    ids = {i: t for t, i in tok["model"]["vocab"].items()} | {
        a["id"]: a["content"] for a in tok["added_tokens"]
    }
    top = max(ids)
    assert top >= 512
    out = tmp_path / "out"
    out.mkdir()
    result = _invoke(["convert", str(d), "--type", "Q8_0", "-o", str(out / "x.gguf")])
    _assert_one_line_error(
        result,
        f"{d / 'tokenizer.json'}: token {ids[top]!r} has id {top}, but config.json has vocab_size 512 "
        "(embedding rows 0-511)",
    )
    _assert_empty(out)


@pytest.mark.parametrize("variant", ["tied", "untied", "odd-head-dim", "sharded", "full-vocab"])
def test_legitimate_fixtures_pass_the_checks(checkpoint, variant: str) -> None:
    """The checks refuse no real layout: tied and untied output, head_dim * heads != hidden,
    shards, and Qwen3's padded vocabulary (151,936 rows for 151,669 token ids)."""
    result = _invoke(["convert", str(checkpoint(variant)), "--type", "Q8_0", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["tensors"][0]["name"] == "token_embd.weight"


def test_qwen3_micro_passes_the_checks(qwen3_micro: Path) -> None:
    result = _invoke(["convert", str(qwen3_micro), "--type", "Q4_0", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["tensors"]) == 2 + 8 * 11


# -- calibration text -----------------------------------------------------------------------

LATIN1 = "The café on the corner serves crème brûlée. ".encode("latin-1")
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10" + bytes(range(256))

# (id, the file's bytes or None for a folder/absent file, expected message with {p} = path)
CALIB_CASES: list[tuple[str, bytes | None, str]] = [
    ("empty", b"", "{p}: empty file, no calibration text"),
    ("whitespace", b" \n\t\r\n" * 200, "{p}: only whitespace, no calibration text"),
    ("png", PNG, "{p}: binary data, not text (NUL byte at offset 8)"),
    ("nul-bytes", b"plain words " * 50 + b"\x00" * 64, "{p}: binary data, not text (NUL byte at offset 600)"),
    (
        "bytes-no-nul",
        bytes(range(1, 256)) * 8,
        "{p}: not UTF-8 (byte offset 127: 0x80); re-encode the text as UTF-8",
    ),
    (
        "latin-1",
        b"plain words " * 50 + LATIN1,
        "{p}: not UTF-8 (byte offset 607: 0xe9); re-encode the text as UTF-8",
    ),
    (
        "utf-16",
        "Calibration text saved as UTF-16 by an editor.".encode("utf-16"),
        "{p}: UTF-16 text (byte order mark); calibration text must be UTF-8",
    ),
]


def _gptq_args(ckpt: Path, out: Path, text: Path) -> list[str]:
    return ["convert", str(ckpt), "--method", "gptq", "--type", "Q8_0", "-o", str(out / "x.gguf"),
            "--nsamples", "4", "--seqlen", "32", "--calib", str(text)]  # fmt: skip


@pytest.fixture
def no_solver(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks must come before the first layer is solved: reaching the solver fails the test."""
    import ggq.convert

    def reached(*args: object, **kwargs: object) -> object:
        raise AssertionError("the solver was reached with calibration text that cannot serve")

    monkeypatch.setattr(ggq.convert, "solve_layers", reached)


@pytest.mark.parametrize(("data", "message"), [pytest.param(d, m, id=i) for i, d, m in CALIB_CASES])
def test_calibration_text_that_cannot_serve_is_one_line(
    checkpoint, tmp_path: Path, no_solver: None, data: bytes, message: str
) -> None:
    """Regression: a NUL-padded or whitespace-only file was tokenized into windows and a GPTQ
    file written (exit 0); a PNG was called 'not UTF-8 (byte offset 0)'."""
    text = tmp_path / "calib.txt"
    text.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    result = _invoke(_gptq_args(checkpoint("tied"), out, text))
    _assert_one_line_error(result, message.format(p=text))
    _assert_empty(out)
    with pytest.raises(calib.CalibrationError) as info:  # the library says the same
        calib.read_text(text)
    assert str(info.value) == message.format(p=text)


def test_calibration_text_too_short_says_what_is_needed(checkpoint, tmp_path: Path, no_solver: None) -> None:
    from tokenizers import Tokenizer

    ckpt = checkpoint("tied")
    text = tmp_path / "short.txt"
    text.write_text("Only a few words of calibration text.")
    n = len(Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode(text.read_text()).ids)
    out = tmp_path / "out"
    out.mkdir()
    result = _invoke(_gptq_args(ckpt, out, text))
    _assert_one_line_error(
        result,
        f"{text}: the text has {n} tokens, but --nsamples 4 x --seqlen 32 needs 128; it is shorter "
        "than one window of 32: use a longer text or a lower --seqlen",
    )
    _assert_empty(out)


@pytest.mark.parametrize("kind", ["directory", "missing"])
def test_calibration_path_that_is_not_a_file_is_named(checkpoint, tmp_path: Path, kind: str) -> None:
    """click's own check on the command line (a usage error, exit 2); the library's for callers."""
    text = tmp_path / "calib"
    if kind == "directory":
        text.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    result = _invoke(_gptq_args(checkpoint("tied"), out, text))
    problem = "is a directory" if kind == "directory" else "does not exist"
    assert result.exit_code == 2
    assert (
        result.output.strip().splitlines()[-1]
        == f"Error: Invalid value for '--calib': File '{text}' {problem}."
    )
    _assert_empty(out)
    with pytest.raises(calib.CalibrationError) as info:
        calib.sample_windows(checkpoint("tied") / "tokenizer.json", text, nsamples=1, seqlen=8)
    assert str(info.value) == f"{text}: " + (
        "a directory, not a text file" if kind == "directory" else "not found"
    )


def test_study_refuses_bad_calibration_text_before_any_file(checkpoint, tmp_path: Path) -> None:
    text = tmp_path / "calib.txt"
    text.write_bytes(PNG)
    out = tmp_path / "study"
    result = _invoke(["study", str(checkpoint("tied")), "-o", str(out), "--calib", str(text)])
    _assert_one_line_error(result, f"{text}: binary data, not text (NUL byte at offset 8)")
    assert not out.exists()


# -- numbers that make no sense -------------------------------------------------------------


def _range(option: str, value: str, bound: str) -> str:
    return f"Invalid value for {option}: {value} is not in the range {bound}."


NUMBER_CASES: list[tuple[str, list[str], str]] = [
    ("convert-nsamples-0", ["--nsamples", "0"], _range("'--nsamples'", "0", "x>=1")),
    ("convert-nsamples-neg", ["--nsamples", "-1"], _range("'--nsamples'", "-1", "x>=1")),
    ("convert-seqlen-0", ["--seqlen", "0"], _range("'--seqlen'", "0", "x>=8")),
    ("convert-damp-0", ["--damp", "0"], _range("'--damp'", "0.0", "x>0")),
    ("convert-damp-neg", ["--damp", "-0.5"], _range("'--damp'", "-0.5", "x>0")),
    ("convert-damp-nan", ["--damp", "nan"], "Invalid value for '--damp': nan is not a finite number"),
    ("convert-damp-inf", ["--damp", "inf"], "Invalid value for '--damp': inf is not a finite number"),
    ("convert-threads-neg", ["--threads", "-1"], _range("'-t' / '--threads'", "-1", "x>=0")),
    ("ppl-ctx-0", ["-c", "0"], _range("'-c' / '--ctx-size'", "0", "x>=4")),
    ("ppl-ctx-neg", ["-c", "-5"], _range("'-c' / '--ctx-size'", "-5", "x>=4")),
    (
        "ppl-ctx-too-many-sequences",
        ["-c", "5"],
        "-b 2048 / -c 5: 409 chunks side by side, llama.cpp allows at most 256; lower -b or raise -c",
    ),
    ("ppl-chunks-0", ["--chunks", "0"], _range("'--chunks'", "0", "x>=1")),
    ("ppl-chunks-neg", ["--chunks", "-1"], _range("'--chunks'", "-1", "x>=1")),
    ("ppl-batch-0", ["-b", "0"], _range("'-b' / '--batch-size'", "0", "x>=1")),
    ("ppl-threads-neg", ["-t", "-1"], _range("'-t' / '--threads'", "-1", "x>=0")),
    ("study-bits-7", ["--bits", "7"], "--bits: '7' is not one of 2, 3, 4, 5, 6, 8"),
    ("study-bits-0", ["--bits", "4,0"], "--bits: '0' is not one of 2, 3, 4, 5, 6, 8"),
    ("study-bits-empty", ["--bits", ""], "--bits '': empty; give one or more of 2, 3, 4, 5, 6, 8"),
    ("study-methods-empty", ["--methods", ""], "--methods '': empty; give one or more of rtn, gptq, awq, awq+gptq"),
    ("study-methods-commas", ["--methods", ", ,"], "--methods ', ,': empty; give one or more of rtn, gptq, awq, awq+gptq"),
    ("study-nsamples-0", ["--nsamples", "0"], _range("'--nsamples'", "0", "x>=1")),
    ("study-chunks-0", ["--chunks", "0"], _range("'--chunks'", "0", "x>=1")),
    ("study-ctx-5", ["-c", "5"], _range("'-c' / '--ctx-size'", "5", "x>=8")),
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), [pytest.param(a, m, id=i) for i, a, m in NUMBER_CASES])
def test_numbers_that_make_no_sense_are_refused(
    checkpoint, tmp_path: Path, no_solver: None, args: list[str], message: str, request: pytest.FixtureRequest
) -> None:
    """Each is refused before any file is read or written. Regression: --damp nan/inf reached the
    solver ('Hessian not positive definite even with damping nan'); an empty --methods or --bits
    ran a study of nothing (exit 0); -c 5 was a llama.cpp traceback."""
    command = request.node.callspec.id.split("-")[0]
    out = tmp_path / "out"
    out.mkdir()
    base = {
        "convert": ["convert", str(checkpoint("tied")), "--method", "gptq", "--type", "Q8_0",
                    "-o", str(out / "x.gguf"), "--nsamples", "4", "--seqlen", "32"],
        "ppl": ["ppl", str(tmp_path / "never-read.gguf"), "-f", str(tmp_path / "never-read.txt")],
        "study": ["study", str(checkpoint("tied")), "-o", str(out / "study")],
    }[command]  # fmt: skip
    result = _invoke([*base, *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == f"Error: {message}"
    _assert_empty(out)
