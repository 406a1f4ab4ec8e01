"""Fixture checkpoints load in transformers; the built tokenizer is the real Qwen2/Qwen3 BPE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from ggq import native, testing

MULTILINGUAL = [
    "Hello world, this is 🦙.cpp!",
    "Äpfel und Birnen — naïve café façade",
    "нещо на Български и Ελληνικά",
    "日本語のテキストと中文文本，还有한국어",
    "def f(x):\n\treturn x ** 2  # comment\r\n",
    "   leading spaces\n\n\nand 12345 numbers 3.14159",
    "<|im_start|>user\nhi<|im_end|>\n<think>\n\n</think>\n\n",
]


@pytest.fixture(scope="module")
def full_tokenizer() -> Tokenizer:
    return Tokenizer.from_str(json.dumps(testing.tokenizer_json()))


def test_vocabulary_sizes_match_the_qwen2_file() -> None:
    tokens, merges = testing.qwen2_bpe()
    assert len(tokens) == 151_643
    assert len(merges) == 151_387


def test_tokenizer_matches_llama_cpp_vectors(full_tokenizer: Tokenizer) -> None:
    """Every case of llama.cpp's own ggml-vocab-qwen2.gguf.inp/.out test vectors."""
    inp = native.data_path("vocab", "ggml-vocab-qwen2.gguf.inp").read_text(encoding="utf-8")
    out = native.data_path("vocab", "ggml-vocab-qwen2.gguf.out").read_text(encoding="utf-8").splitlines()
    cases = inp.split("\n__ggml_vocab_test__\n")
    if cases[-1] == "":
        cases.pop()
    assert len(cases) == len(out) >= 40
    mismatches = []
    for text, ids in zip(cases, out, strict=True):
        got = full_tokenizer.encode(text, add_special_tokens=False).ids
        if got != [int(t) for t in ids.split()]:
            mismatches.append(text)
    assert mismatches == []


def test_tokenizer_round_trips_and_parses_special_tokens(full_tokenizer: Tokenizer) -> None:
    for text in MULTILINGUAL:
        ids = full_tokenizer.encode(text, add_special_tokens=False).ids
        assert full_tokenizer.decode(ids, skip_special_tokens=False) == text
    ids = full_tokenizer.encode("<|im_start|>user<|im_end|><think></think>", add_special_tokens=False).ids
    assert ids == [151644, 872, 151645, 151667, 151668]


def test_truncated_vocabulary_equals_qwen3_micro(qwen3_micro: Path) -> None:
    """qwen3-micro kept the first 16,358 ranks; building the same cut from the vocab file must agree."""
    ours = testing.tokenizer_json(16_358)
    theirs = json.loads((qwen3_micro / "tokenizer.json").read_text())
    assert ours["model"]["vocab"] == theirs["model"]["vocab"]
    assert ours["model"]["merges"] == theirs["model"]["merges"]
    assert [t["content"] for t in ours["added_tokens"]] == [t["content"] for t in theirs["added_tokens"]]
    assert [t["id"] for t in ours["added_tokens"]] == [t["id"] for t in theirs["added_tokens"]]
    tok_ours = Tokenizer.from_str(json.dumps(ours))
    tok_theirs = Tokenizer.from_file(str(qwen3_micro / "tokenizer.json"))
    for text in MULTILINGUAL:
        assert tok_ours.encode(text).ids == tok_theirs.encode(text).ids


@pytest.mark.parametrize("variant", list(testing.VARIANTS))
def test_fixture_loads_in_transformers(checkpoint, variant: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = checkpoint(variant)
    spec = testing.VARIANTS[variant]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    assert int(ids.max()) < spec.vocab_size
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], spec.vocab_size)
    assert torch.isfinite(logits).all()
    assert float(logits.std()) > 0
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == spec.tie_word_embeddings
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (
        spec.num_attention_heads,
        spec.num_key_value_heads,
        spec.head_dim,
    )


def test_sharded_fixture_has_an_index_and_every_weight(checkpoint) -> None:
    from safetensors import safe_open

    path = checkpoint("sharded")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 3
    names = set()
    for fname in files:
        with safe_open(str(path / fname), framework="pt") as f:
            keys = list(f.keys())
            names |= set(keys)
            assert all(f.get_slice(k).get_dtype() == "BF16" for k in keys)
    assert names == set(index["weight_map"]) == set(testing.random_weights(testing.VARIANTS["sharded"]))


def test_odd_head_dim_differs_from_hidden_over_heads() -> None:
    spec = testing.VARIANTS["odd-head-dim"]
    assert spec.head_dim * spec.num_attention_heads != spec.hidden_size


def test_fixtures_are_deterministic(tmp_path: Path) -> None:
    a = testing.build_checkpoint(tmp_path / "a", "tied")
    b = testing.build_checkpoint(tmp_path / "b", "tied")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_chat_template_renders_qwen3_turns(checkpoint) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint("tied"))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
