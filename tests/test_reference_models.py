"""The trained reference models beside qwen3-micro, checked against their READMEs and llama.cpp,
and tools/train_reference.py, the script that trains them (resuming gives the same bytes)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from ggq.files import sha256_file
from tests.test_convert import hf_ids, hf_logits, llama_logits, to_gguf

ROOT = Path(__file__).resolve().parent.parent
MICRO_B = ROOT / "models" / "qwen3-micro-b"
sys.path.insert(0, str(ROOT / "tools"))

import train_reference  # noqa: E402


def readme(model: Path) -> str:
    if not (model / "model.safetensors").is_file():
        pytest.skip(f"reference model not found at {model}")
    return (model / "README.md").read_text(encoding="utf-8")


def test_micro_b_safetensors_sha256_is_the_readmes() -> None:
    m = re.search(r"sha256 \(model\.safetensors\) \| `([0-9a-f]{64})`", readme(MICRO_B))
    assert m, "README has no sha256 row"
    assert sha256_file(MICRO_B / "model.safetensors") == m.group(1)


def test_micro_b_config_and_weights_have_the_readmes_shape() -> None:
    from transformers import AutoConfig

    text = readme(MICRO_B)
    m = re.search(
        r"(\d+) layers, hidden (\d+), (\d+) query heads / (\d+) KV heads, head_dim (\d+), FFN (\d+)", text
    )
    p = re.search(r"\| parameters \| ([\d,]+)", text)
    assert m and p, "README has no architecture or parameters row"
    layers, hidden, heads, kv, head_dim, ffn = map(int, m.groups())
    cfg = AutoConfig.from_pretrained(MICRO_B)
    got = (
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.intermediate_size,
    )
    assert got == (layers, hidden, heads, kv, head_dim, ffn)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 16384
    assert json.loads((MICRO_B / "config.json").read_text())["rope_parameters"]["rope_theta"] == 1e6
    with safe_open(MICRO_B / "model.safetensors", "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}  # noqa: SIM118
    assert "lm_head.weight" not in shapes  # tied
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == [heads * head_dim, hidden]
    assert sum(int(np.prod(s)) for s in shapes.values()) == int(p.group(1).replace(",", ""))


def test_micro_b_converts_and_llama_cpp_logits_equal_transformers(tmp_path: Path, heldout: Path) -> None:
    from ggq import native

    readme(MICRO_B)
    gguf = to_gguf(MICRO_B, tmp_path / "b-f32.gguf")
    ids = hf_ids(MICRO_B, heldout.read_text(encoding="utf-8")[:1500])[:64]
    ours, ref = llama_logits(native.import_llama_cpp(), gguf, ids), hf_logits(MICRO_B, ids)
    assert np.abs(ours - ref).max() < 1e-3 * float(ref.max() - ref.min())
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() == 1.0


TINY = [
    "--layers", "1", "--hidden", "64", "--heads", "2", "--kv-heads", "1", "--head-dim", "32",
    "--intermediate", "128", "--steps", "4", "--batch", "2", "--seq", "32", "--warmup", "1",
    "--threads", "2", "--log-every", "1",
]  # fmt: skip


def test_resumed_training_writes_the_same_bytes_as_one_run(tmp_path: Path, small_text: Path) -> None:
    """Resuming restores weights, optimizer moments and the batch sequence: a run stopped at step 2
    and resumed ends in the same model.safetensors as one that ran 4 steps straight."""
    common = [*TINY, "--text", str(small_text)]
    assert (
        train_reference.main([*common, "--ckpt-dir", str(tmp_path / "c1"), "--out", str(tmp_path / "a")]) == 0
    )
    c2 = ["--ckpt-dir", str(tmp_path / "c2"), "--out", str(tmp_path / "b")]
    assert train_reference.main([*common, *c2, "--stop-after", "2"]) == 0
    assert not (tmp_path / "b").exists()
    assert train_reference.main([*common, *c2, "--resume"]) == 0
    a, b = (sha256_file(tmp_path / d / "model.safetensors") for d in ("a", "b"))
    assert a == b
    for name in train_reference.TOKENIZER_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (train_reference.TOKENIZER_DIR / name).read_bytes()
    # and a different seed is a different model, so the equality above says something
    c3 = ["--ckpt-dir", str(tmp_path / "c3"), "--out", str(tmp_path / "c"), "--seed", "2"]
    assert train_reference.main([*common, *c3]) == 0
    assert sha256_file(tmp_path / "c" / "model.safetensors") != a


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--resume"], "--resume"),
        (
            ["--arch", "qwen3_moe", "--experts", "4", "--experts-per-tok", "8", "--moe-intermediate", "64"],
            "8",
        ),
        (["--arch", "llama"], "--arch llama"),
        (["--kv-heads", "3"], "--kv-heads 3"),
    ],
)
def test_bad_options_exit_2_with_one_line(
    tmp_path: Path, small_text: Path, capsys: pytest.CaptureFixture[str], extra: list[str], named: str
) -> None:
    args = [*TINY, "--text", str(small_text), "--ckpt-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o")]
    assert train_reference.main([*args, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err
    assert not (tmp_path / "o").exists()
