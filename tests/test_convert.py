"""`ggq convert` against independent references: llama.cpp loads and runs the files, its logits
equal transformers', its tokenizer equals Hugging Face's, and llama-quantize plans the same types."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ggq import native, testing
from ggq.checkpoint import Checkpoint, CheckpointError
from ggq.cli import main
from ggq.convert import ConvertOptions, convert, make_plan
from ggq.gguf import read_gguf, read_metadata
from ggq.plan import recipe as rc

TEXT = "Hello world, this is a test. Äpfel 日本語 <|im_start|>user\nhi<|im_end|>\n<think>\n\n</think>"


def to_gguf(ckpt_dir: Path, out: Path, file_type: str = "F32", **recipe_kw: object) -> Path:
    opts = ConvertOptions(recipe=rc.RecipeOptions(file_type=file_type, **recipe_kw))  # type: ignore[arg-type]
    convert(Checkpoint(ckpt_dir), out, opts)
    return out


@pytest.fixture(scope="module")
def llama_cpp():  # type: ignore[no-untyped-def]
    return native.import_llama_cpp()


def llama_logits(llama_cpp, gguf: Path, ids: list[int]) -> np.ndarray:  # type: ignore[no-untyped-def]
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


def hf_logits(ckpt_dir: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def hf_ids(ckpt_dir: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(ckpt_dir)(text).input_ids)


@pytest.mark.parametrize("variant", ["tied", "untied", "odd-head-dim", "sharded", "full-vocab"])
def test_f32_logits_and_tokens_equal_transformers(
    checkpoint, llama_cpp, tmp_path: Path, variant: str
) -> None:
    ckpt_dir = checkpoint(variant)
    gguf = to_gguf(ckpt_dir, tmp_path / "f32.gguf")
    ids = hf_ids(ckpt_dir, TEXT)
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=128, verbose=False, vocab_only=True)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == ids
    ours, ref = llama_logits(llama_cpp, gguf, ids), hf_logits(ckpt_dir, ids)
    assert np.abs(ours - ref).max() < 1e-3 * float(ref.max() - ref.min())


def test_qwen3_micro_f32_logits_equal_transformers(
    qwen3_micro: Path, llama_cpp, tmp_path: Path, heldout: Path
) -> None:
    gguf = to_gguf(qwen3_micro, tmp_path / "micro-f32.gguf")
    text = heldout.read_text(encoding="utf-8")[:2000]
    ids = hf_ids(qwen3_micro, text)[:100]
    ours, ref = llama_logits(llama_cpp, gguf, ids), hf_logits(qwen3_micro, ids)
    assert np.abs(ours - ref).max() < 1e-3 * float(ref.max() - ref.min())
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() == 1.0


def test_tokenizer_in_gguf_equals_hugging_face_on_mixed_text(
    qwen3_micro: Path, llama_cpp, tmp_path: Path
) -> None:
    gguf = to_gguf(qwen3_micro, tmp_path / "vocab.gguf", "F16")
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=64, verbose=False, vocab_only=True)
    samples = [
        "The quick brown fox; naïve café, Ünïcödé — “quotes”…",
        "Здравствуй, мир! Γειά σου κόσμε. 你好，世界。こんにちは",
        "def main(argv):\n    return {'a': [1, 2, 3]}  # code\n\tif x >= 10: pass\r\n",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n<think>hm</think>ok<|im_end|>",
        "   spaces   and\n\n\nnewlines 1234567 3.14",
    ]
    for text in samples:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf_ids(qwen3_micro, text), text


def test_chat_template_in_gguf_renders_like_transformers(checkpoint, tmp_path: Path) -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from transformers import AutoTokenizer

    ckpt_dir = checkpoint("tied")
    gguf = to_gguf(ckpt_dir, tmp_path / "t.gguf")
    template = read_metadata(gguf)["tokenizer.chat_template"]
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello!"},
        {"role": "user", "content": "Again"},
    ]
    tok = AutoTokenizer.from_pretrained(ckpt_dir)
    for thinking in (True, False):
        ref = tok.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
        )
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        ours = env.from_string(template).render(
            messages=msgs, add_generation_prompt=True, enable_thinking=thinking
        )
        assert ours == ref


def test_metadata_names_hparams_and_tokens(checkpoint, tmp_path: Path) -> None:
    ckpt_dir = checkpoint("odd-head-dim")
    meta = read_metadata(to_gguf(ckpt_dir, tmp_path / "m.gguf"))
    spec = testing.VARIANTS["odd-head-dim"]
    assert meta["general.architecture"] == "qwen3"
    assert meta["qwen3.attention.key_length"] == meta["qwen3.attention.value_length"] == spec.head_dim
    assert meta["qwen3.embedding_length"] == spec.hidden_size
    assert meta["qwen3.attention.head_count_kv"] == spec.num_key_value_heads
    assert meta["tokenizer.ggml.pre"] == "qwen2" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.add_bos_token"] is False
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == spec.vocab_size
    by_text = dict(zip(tokens, types, strict=True))
    assert by_text["<|im_end|>"] == 3 and by_text["<think>"] == 4 and by_text["</think>"] == 4
    assert tokens[meta["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
    assert tokens[meta["tokenizer.ggml.padding_token_id"]] == "<|endoftext|>"
    assert meta["ggq.method"] == "rtn"


def test_same_input_gives_byte_identical_file(checkpoint, tmp_path: Path) -> None:
    ckpt_dir = checkpoint("untied")
    a = to_gguf(ckpt_dir, tmp_path / "a.gguf", "F16")
    b = to_gguf(ckpt_dir, tmp_path / "b.gguf", "F16")
    assert a.read_bytes() == b.read_bytes()


# --- the tensor-type plan equals llama-quantize's -------------------------------------------

RECIPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
RECIPES += ["Q3_K_M", "Q3_K_S", "Q3_K_L", "Q2_K", "IQ4_NL", "IQ4_XS", "F16", "BF16"]


@pytest.fixture(scope="module")
def plan_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Fixtures whose rows fit 256-blocks (16 layers: every use_more_bits branch) and ones that do not."""
    out = {}
    specs = {
        "wide-untied": replace(
            testing.WIDE, num_hidden_layers=16, vocab_size=512, tie_word_embeddings=False, seed=7
        ),
        "wide-tied": replace(testing.WIDE, num_hidden_layers=8, vocab_size=512, seed=8),
        "narrow-tied": testing.VARIANTS["tied"],
        "odd-head-dim": testing.VARIANTS["odd-head-dim"],
    }
    for name, spec in specs.items():
        d = testing.build_checkpoint(tmp_path_factory.mktemp(name), spec)
        out[name] = (d, to_gguf(d, d / "f32.gguf"))
    return out


def llama_quantize_types(src: Path, dst: Path, file_type: str, *extra: str) -> dict[str, str]:
    from gguf import GGUFReader

    cmd = [str(native.tool_path("llama-quantize")), *extra, str(src), str(dst), file_type, "2"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return {t.name: t.tensor_type.name for t in GGUFReader(dst).tensors}


@pytest.mark.parametrize("file_type", RECIPES)
def test_plan_equals_llama_quantize(plan_models, tmp_path: Path, file_type: str) -> None:
    for name, (ckpt_dir, f32) in plan_models.items():
        ref = llama_quantize_types(f32, tmp_path / f"{name}.gguf", file_type)
        ours = {
            t.name: t.type
            for t in make_plan(Checkpoint(ckpt_dir), ConvertOptions(rc.RecipeOptions(file_type)))
        }
        assert ours == ref, name


@pytest.mark.parametrize(
    ("args", "kw"),
    [
        (["--pure"], {"pure": True}),
        (["--output-tensor-type", "q8_0"], {"output_tensor_type": "Q8_0"}),
        (["--token-embedding-type", "q4_k"], {"token_embedding_type": "Q4_K"}),
        (
            ["--tensor-type", "attn_v=q8_0", "--tensor-type", "ffn_down=q5_k"],
            {"tensor_types": (("attn_v", "Q8_0"), ("ffn_down", "Q5_K"))},
        ),
        (["--leave-output-tensor"], {"leave_output_tensor": True}),
    ],
)
def test_plan_options_equal_llama_quantize(plan_models, tmp_path: Path, args: list[str], kw: dict) -> None:
    for name in ("wide-untied", "wide-tied"):
        ckpt_dir, f32 = plan_models[name]
        ref = llama_quantize_types(f32, tmp_path / f"{name}.gguf", "Q4_K_M", *args)
        ours = {
            t.name: t.type
            for t in make_plan(Checkpoint(ckpt_dir), ConvertOptions(rc.RecipeOptions("Q4_K_M", **kw)))
        }
        assert ours == ref, name


# --- bad input ----------------------------------------------------------------------------------


def test_unsupported_architecture_is_named(checkpoint, tmp_path: Path) -> None:
    import json
    import shutil

    d = tmp_path / "llama"
    shutil.copytree(checkpoint("tied"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    result = CliRunner().invoke(main, ["convert", str(d), "--type", "F16", "-o", str(tmp_path / "x.gguf")])
    assert result.exit_code == 2
    assert "LlamaForCausalLM is not supported; supported: Qwen3ForCausalLM" in result.output
    assert not (tmp_path / "x.gguf").exists()


def test_missing_directory_and_offline_hub_id_are_one_line_errors(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(main, ["convert", "Qwen/Qwen3-0.6B", "--dry-run"])
    assert (
        result.exit_code != 0 and "Qwen/Qwen3-0.6B: cannot fetch from the Hugging Face hub" in result.output
    )
    assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "nope"), "--dry-run"])
    assert result.exit_code != 0 and "not a Hugging Face hub id" in result.output


def test_unknown_type_names_the_option(checkpoint) -> None:
    result = CliRunner().invoke(main, ["convert", str(checkpoint("tied")), "--type", "Q7_K"])
    assert result.exit_code == 2 and "unknown file type 'Q7_K'" in result.output and "Q4_K_M" in result.output
    result = CliRunner().invoke(main, ["convert", str(checkpoint("tied")), "--tensor-type", "attn_v"])
    assert result.exit_code != 0 and "expected REGEX=TYPE" in result.output


def test_failed_write_leaves_no_file(checkpoint, tmp_path: Path, monkeypatch) -> None:
    """A crash mid-write must not leave a half-written GGUF under the final name."""
    ckpt = Checkpoint(checkpoint("untied"))
    calls = {"n": 0}
    real_load = ckpt.load

    def failing_load(name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 5:
            raise CheckpointError(f"{name}: simulated read error")
        return real_load(name, start, stop)

    monkeypatch.setattr(ckpt, "load", failing_load)
    out = tmp_path / "out.gguf"
    with pytest.raises(CheckpointError, match="simulated"):
        convert(ckpt, out, ConvertOptions(rc.RecipeOptions("F16")))
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(checkpoint, tmp_path: Path) -> None:
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep")
    result = CliRunner().invoke(main, ["convert", str(checkpoint("tied")), "--type", "F16", "-o", str(out)])
    assert result.exit_code != 0 and "already exists" in result.output and out.read_bytes() == b"keep"
    result = CliRunner().invoke(
        main, ["convert", str(checkpoint("tied")), "--type", "F16", "-o", str(out), "--force"]
    )
    assert result.exit_code == 0, result.output
    assert read_gguf(out).metadata["general.file_type"] == 1


def test_nan_weight_names_the_tensor(checkpoint, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "nan"
    shutil.copytree(checkpoint("tied"), d)
    weights = load_file(str(d / "model.safetensors"))
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    result = CliRunner().invoke(main, ["convert", str(d), "--type", "Q8_0", "-o", str(tmp_path / "x.gguf")])
    assert result.exit_code == 2
    assert "model.layers.1.mlp.up_proj.weight: 1 NaN/Inf values" in result.output
    assert not (tmp_path / "x.gguf").exists()


def test_bad_tensor_type_regex_is_named(checkpoint) -> None:
    result = CliRunner().invoke(
        main, ["convert", str(checkpoint("tied")), "--tensor-type", "attn_(v=Q8_0", "--dry-run"]
    )
    assert result.exit_code == 2 and "is not a valid regex" in result.output


def test_dry_run_prints_plan_with_totals(checkpoint) -> None:
    result = CliRunner().invoke(main, ["convert", str(checkpoint("tied")), "--type", "Q8_0", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "blk.1.ffn_down.weight" in result.output and "total (24 tensors)" in result.output


# --- RTN tensors equal llama-quantize's, byte for byte --------------------------------------


@pytest.fixture(scope="module")
def imatrix_for(plan_models, tmp_path_factory: pytest.TempPathFactory, calibration_text: Path):  # type: ignore[no-untyped-def]
    """llama-imatrix's own importance matrix for a plan model, from real calibration text."""
    text = tmp_path_factory.mktemp("calib") / "calib.txt"
    text.write_bytes(calibration_text.read_bytes()[:30000])
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            f32 = plan_models[name][1]
            out = f32.parent / "imatrix.gguf"
            cmd = [str(native.tool_path("llama-imatrix")), "-m", str(f32), "-f", str(text), "-o", str(out)]
            subprocess.run(
                [*cmd, "-c", "128", "--chunks", "6", "-t", "2"], check=True, capture_output=True, timeout=300
            )
            made[name] = out
        return made[name]

    return get


BYTE_RECIPES = [
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "IQ4_NL",
    "Q6_K",
    "Q5_K_M",
    "Q4_K_M",
    "Q4_K_S",
    "Q3_K_M",
    "Q2_K",
]


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["rtn", "imatrix"])
@pytest.mark.parametrize("file_type", BYTE_RECIPES)
def test_rtn_tensors_equal_llama_quantize(
    plan_models, imatrix_for, tmp_path: Path, file_type: str, with_imatrix: bool
) -> None:
    from ggq.imatrix import load_imatrix

    name = "wide-untied"
    ckpt_dir, f32 = plan_models[name]
    extra, imatrix, kw = [], None, {}
    if with_imatrix:
        path = imatrix_for(name)
        extra, imatrix, kw = ["--imatrix", str(path)], load_imatrix(path), {"has_imatrix": True}
    ref_path = tmp_path / "ref.gguf"
    cmd = [str(native.tool_path("llama-quantize")), *extra, str(f32), str(ref_path), file_type, "2"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    ours_path = tmp_path / "ours.gguf"
    convert(Checkpoint(ckpt_dir), ours_path, ConvertOptions(rc.RecipeOptions(file_type, **kw)), imatrix)
    ref, ours = read_gguf(ref_path), read_gguf(ours_path)
    assert set(ours.tensors) == set(ref.tensors)  # llama-quantize writes them in its own order
    differing = [
        n
        for n in ref.tensors
        if ours.tensors[n].type_id != ref.tensors[n].type_id
        or not np.array_equal(ours.tensor_data(n), ref.tensor_data(n))
    ]
    assert differing == []


# --- quality on the trained model, judged by llama-perplexity --------------------------------


def test_qwen3_micro_float_and_q8_0_quality(qwen3_micro: Path, heldout: Path, tmp_path: Path) -> None:
    """llama-perplexity's own KL-divergence of ggq's files against ggq's F32 file (held-out text,
    24 chunks of 512). Reference: llama.cpp's own Q8_0 of this model has KLD 0.00020, top-1 98.8%."""
    from ggq.eval import llama_tools

    text = heldout
    f32 = to_gguf(qwen3_micro, tmp_path / "f32.gguf")
    base = llama_tools.kld_base(f32, text, tmp_path / "base.kld", chunks=24)
    limits = {"Q8_0": (0.0003, 0.98), "F16": (0.0001, 0.995), "BF16": (0.0001, 0.995)}
    for file_type, (max_kld, min_top) in limits.items():
        r = llama_tools.kld(to_gguf(qwen3_micro, tmp_path / f"{file_type}.gguf", file_type), base, chunks=24)
        assert r["kld"] <= max_kld and r["top1"] / 100 >= min_top, (file_type, r)


@pytest.mark.parametrize("variant", ["tied", "untied", "odd-head-dim", "sharded"])
def test_llama_cpp_runs_every_type(checkpoint, llama_cpp, tmp_path: Path, variant: str) -> None:
    """Every recipe of every fixture variant loads in llama.cpp and gives finite logits."""
    ckpt_dir = checkpoint(variant)
    ids = hf_ids(ckpt_dir, TEXT)[:16]
    for file_type in [*RECIPES, "F32"]:
        logits = llama_logits(llama_cpp, to_gguf(ckpt_dir, tmp_path / f"{file_type}.gguf", file_type), ids)
        assert logits.shape == (len(ids), testing.VARIANTS[variant].vocab_size)
        assert np.isfinite(logits).all(), file_type


def test_f16_file_equals_llama_cpp_convert_hf_to_gguf(checkpoint, tmp_path: Path) -> None:
    """llama.cpp's own converter on the full-vocabulary fixture (real Qwen2 BPE, so its
    pre-tokenizer hash is recognised): every key it writes has the same value in ggq's file
    (general.name aside: a display string), and every tensor has the same type and bytes."""
    import sys

    ckpt_dir = checkpoint("full-vocab")
    ref_path = tmp_path / "ref.gguf"
    script = Path(__file__).resolve().parent.parent / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    cmd = [sys.executable, str(script), str(ckpt_dir), "--outtype", "f16", "--outfile", str(ref_path)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    ref, ours = read_gguf(ref_path), read_gguf(to_gguf(ckpt_dir, tmp_path / "ours.gguf", "F16"))
    differing = []
    for key, value in ref.metadata.items():
        mine = ours.metadata.get(key, "<missing>")
        same = np.array_equal(value, mine) if isinstance(value, np.ndarray) else value == mine
        if not same and key != "general.name":
            differing.append(key)
    assert differing == []
    assert sorted(ours.tensors) == sorted(ref.tensors)
    for name, t in ref.tensors.items():
        assert ours.tensors[name].type_id == t.type_id, name
        assert np.array_equal(ours.tensor_data(name), ref.tensor_data(name)), name


def test_chunked_rows_give_the_same_file(checkpoint, tmp_path: Path, monkeypatch) -> None:
    """Streaming a tensor in row chunks (memory bound) must not change a byte of the output."""
    import ggq.convert as conv

    ckpt_dir = checkpoint("untied")
    whole = to_gguf(ckpt_dir, tmp_path / "whole.gguf", "Q4_K_M")
    monkeypatch.setattr(conv, "CHUNK_VALUES", 3 * 64)  # 3 rows of 64 at a time
    chunked = to_gguf(ckpt_dir, tmp_path / "chunked.gguf", "Q4_K_M")
    assert whole.read_bytes() == chunked.read_bytes()


def test_truncated_safetensors_is_named(checkpoint, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "cut"
    shutil.copytree(checkpoint("tied"), d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    result = CliRunner().invoke(main, ["convert", str(d), "--type", "Q8_0", "-o", str(tmp_path / "x.gguf")])
    assert (
        result.exit_code == 2 and "model.safetensors: tensor" in result.output and "corrupt" in result.output
    )
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("args", [["--type", "Q4_K_M"], ["--type", "Q4_0", "--dry-run"]])
def test_rtn_convert_never_imports_torch(checkpoint, tmp_path: Path, args: list[str]) -> None:
    # torch is ~200 MiB of resident memory that RTN does not use: on a real-size (MoE) checkpoint
    # it was two thirds of ggq convert's whole peak RSS
    out = tmp_path / "rtn.gguf"
    cmd = [
        sys.executable,
        "-X",
        "importtime",
        "-m",
        "ggq.cli",
        "convert",
        str(checkpoint("tied")),
        "-o",
        str(out),
    ]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "ggq.convert" in imported  # the check sees ggq's own imports, so it would see torch's
    assert "torch" not in imported
    assert out.exists() != ("--dry-run" in args)
