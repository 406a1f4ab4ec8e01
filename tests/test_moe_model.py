"""models/qwen3-moe-micro, the trained reference Qwen3-MoE, against its README, transformers and
llama.cpp: the weights are the README's (sha256), of its shape, bf16, tied; ggq's F32 file run by
llama.cpp gives transformers' Qwen3MoeForCausalLM logits."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from ggq.files import sha256_file
from tests.test_convert import hf_ids, hf_logits, llama_logits, to_gguf

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "qwen3-moe-micro"


def readme() -> str:
    if not (MODEL / "model.safetensors").is_file():
        pytest.skip(f"reference model not found at {MODEL}")
    return (MODEL / "README.md").read_text(encoding="utf-8")


def test_safetensors_sha256_is_the_readmes() -> None:
    m = re.search(r"sha256 \(model\.safetensors\) \| `([0-9a-f]{64})`", readme())
    assert m, "README has no sha256 row"
    assert sha256_file(MODEL / "model.safetensors") == m.group(1)


def test_config_and_weights_have_the_readmes_shape() -> None:
    from transformers import AutoConfig

    text = readme()
    m = re.search(
        r"(\d+) layers, hidden (\d+), (\d+) query heads / (\d+) KV heads, head_dim (\d+), "
        r"(\d+) experts, (\d+) active, expert FFN (\d+)",
        text,
    )
    p = re.search(r"\| parameters \| ([\d,]+)", text)
    assert m and p, "README has no architecture or parameters row"
    layers, hidden, heads, kv, head_dim, experts, active, ffn = map(int, m.groups())
    cfg = AutoConfig.from_pretrained(MODEL)
    assert cfg.model_type == "qwen3_moe" and cfg.norm_topk_prob and cfg.decoder_sparse_step == 1
    got = (
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.num_experts,
        cfg.num_experts_per_tok,
        cfg.moe_intermediate_size,
    )
    assert got == (layers, hidden, heads, kv, head_dim, experts, active, ffn)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 16384
    with safe_open(MODEL / "model.safetensors", "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}  # noqa: SIM118
    assert "lm_head.weight" not in shapes  # tied
    assert shapes[f"model.layers.0.mlp.experts.{experts - 1}.down_proj.weight"] == [hidden, ffn]
    assert shapes["model.layers.0.mlp.gate.weight"] == [experts, hidden]
    assert sum(int(np.prod(s)) for s in shapes.values()) == int(p.group(1).replace(",", ""))
    for name in ("tokenizer.json", "tokenizer_config.json"):  # qwen3-micro's vocabulary and ids
        assert (MODEL / name).read_bytes() == (ROOT / "models" / "qwen3-micro" / name).read_bytes()


def test_converts_and_llama_cpp_logits_equal_transformers(tmp_path: Path, heldout: Path) -> None:
    from ggq import native

    readme()
    gguf = to_gguf(MODEL, tmp_path / "moe-f32.gguf")
    ids = hf_ids(MODEL, heldout.read_text(encoding="utf-8")[:1500])[:64]
    ours, ref = llama_logits(native.import_llama_cpp(), gguf, ids), hf_logits(MODEL, ids)
    assert np.abs(ours - ref).max() < 1e-3 * float(ref.max() - ref.min())
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() == 1.0
