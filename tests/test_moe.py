"""Qwen3-MoE (``Qwen3MoeForCausalLM`` -> llama.cpp's ``qwen3moe``) against independent references:
llama.cpp's own converter writes the same F32/F16 file, llama-quantize the same bytes for every
RTN recipe, llama.cpp's forward the logits of transformers' Qwen3MoeForCausalLM, and
llama-perplexity the numbers of ``ggq ppl``. Bad checkpoints are named in one line, exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ggq import native, testing
from ggq.checkpoint import Checkpoint
from ggq.cli import main
from ggq.convert import ConvertOptions, convert, make_plan
from ggq.gguf import read_gguf
from ggq.plan import recipe as rc

ROOT = Path(__file__).resolve().parent.parent
CONVERT_HF = ROOT / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
TEXT = "Hello world, this is a test of the experts. <|im_start|>user\nhi<|im_end|>\n"


def to_gguf(ckpt_dir: Path, out: Path, file_type: str = "F32") -> Path:
    convert(Checkpoint(ckpt_dir), out, ConvertOptions(recipe=rc.RecipeOptions(file_type=file_type)))
    return out


def llama_cpp_convert(ckpt_dir: Path, out: Path, outtype: str) -> Path:
    cmd = [sys.executable, str(CONVERT_HF), str(ckpt_dir), "--outtype", outtype, "--outfile", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    return out


def differing_keys(ref: dict[str, object], ours: dict[str, object]) -> list[str]:
    """Keys of ``ref`` whose value differs in ``ours`` (general.name aside: a display string)."""
    out = []
    for key, value in ref.items():
        mine = ours.get(key, "<missing>")
        same = np.array_equal(value, mine) if isinstance(value, np.ndarray) else value == mine  # type: ignore[arg-type]
        if not same and key != "general.name":
            out.append(key)
    return out


# --- the file llama.cpp's own converter writes --------------------------------------------------


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_file_equals_llama_cpp_convert_hf_to_gguf(checkpoint, tmp_path: Path, outtype: str) -> None:
    """Every key convert_hf_to_gguf.py writes (qwen3moe.expert_count, expert_used_count,
    expert_feed_forward_length, the size label ...) has the same value in ggq's file, and every
    tensor the same ggml shape, type and bytes: merged 3-D ffn_*_exps, the router in F32."""
    ckpt_dir = checkpoint("moe-full-vocab")
    ref = read_gguf(llama_cpp_convert(ckpt_dir, tmp_path / "ref.gguf", outtype))
    ours = read_gguf(to_gguf(ckpt_dir, tmp_path / "ours.gguf", outtype.upper()))
    assert ref.metadata["general.architecture"] == "qwen3moe"
    assert differing_keys(ref.metadata, ours.metadata) == []
    assert sorted(ours.tensors) == sorted(ref.tensors)
    spec = testing.MOE_VARIANTS["moe-full-vocab"]
    assert isinstance(spec, testing.Qwen3MoeSpec)
    down = ref.tensors["blk.1.ffn_down_exps.weight"]
    assert tuple(down.shape) == (spec.moe_intermediate_size, spec.hidden_size, spec.num_experts)
    assert ref.tensors["blk.0.ffn_gate_inp.weight"].type_id == 0  # F32
    for name, t in ref.tensors.items():
        assert tuple(ours.tensors[name].shape) == tuple(t.shape), name
        assert ours.tensors[name].type_id == t.type_id, name
        assert np.array_equal(ours.tensor_data(name), ref.tensor_data(name)), name


# --- bad input: one line naming it, exit 2, no output file --------------------------------------


def edited_copy(src: Path, dst: Path, config: dict[str, object] | None = None, **tensors: object) -> Path:
    """A copy of checkpoint ``src`` with config.json keys replaced and tensors replaced
    (a torch tensor) or removed (None); tensor names are given with "." as "__"."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(cfg | (config or {})))
    changes = {k.replace("__", "."): v for k, v in tensors.items()}
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for fname in sorted(set(index["weight_map"].values())):
        weights = load_file(str(dst / fname))
        hit = {k: v for k, v in changes.items() if k in weights}
        for name, value in hit.items():
            if value is None:
                del weights[name], index["weight_map"][name]
            else:
                weights[name] = value  # type: ignore[assignment]
        if hit:
            save_file(weights, str(dst / fname), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    return dst


def convert_fails(ckpt_dir: Path, tmp_path: Path, *args: str) -> str:
    out = tmp_path / "x.gguf"
    result = CliRunner().invoke(main, ["convert", str(ckpt_dir), "--type", "Q4_K_M", "-o", str(out), *args])
    assert result.exit_code == 2, result.output
    assert not out.exists() and not list(tmp_path.glob("x.gguf*"))
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def bf16(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.bfloat16)


def test_missing_expert_is_named(checkpoint, tmp_path: Path) -> None:
    d = edited_copy(
        checkpoint("moe"), tmp_path / "ck", model__layers__1__mlp__experts__5__up_proj__weight=None
    )
    line = convert_fails(d, tmp_path)
    assert "missing tensor model.layers.1.mlp.experts.5.up_proj.weight (num_experts 8)" in line


def test_missing_experts_of_a_layer_are_counted(checkpoint, tmp_path: Path) -> None:
    gone = {f"model__layers__0__mlp__experts__{e}__down_proj__weight": None for e in range(8)}
    d = edited_copy(checkpoint("moe"), tmp_path / "ck", **gone)
    line = convert_fails(d, tmp_path)
    assert "missing tensor model.layers.0.mlp.experts.0.down_proj.weight" in line


def test_misshaped_expert_is_named(checkpoint, tmp_path: Path) -> None:
    d = edited_copy(
        checkpoint("moe"),
        tmp_path / "ck",
        model__layers__0__mlp__experts__3__down_proj__weight=bf16(256, 511),
    )
    line = convert_fails(d, tmp_path)
    assert "tensor model.layers.0.mlp.experts.3.down_proj.weight has shape (256, 511)" in line
    assert "expects (256, 512) = (hidden_size, moe_intermediate_size)" in line


def test_expert_beyond_num_experts_is_named(checkpoint, tmp_path: Path) -> None:
    d = edited_copy(checkpoint("moe"), tmp_path / "ck", config={"num_experts": 6})
    line = convert_fails(d, tmp_path)
    assert "mlp.experts.6." in line and "is expert 6, but" in line and "num_experts 6" in line


def test_router_shape_disagreeing_with_config_is_named(checkpoint, tmp_path: Path) -> None:
    d = edited_copy(checkpoint("moe"), tmp_path / "ck", model__layers__1__mlp__gate__weight=bf16(7, 256))
    line = convert_fails(d, tmp_path)
    assert "tensor model.layers.1.mlp.gate.weight has shape (7, 256)" in line
    assert "expects (8, 256) = (num_experts, hidden_size)" in line


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"num_experts_per_tok": 9}, "num_experts_per_tok 9 is more than num_experts 8"),
        ({"num_experts_per_tok": 0}, "num_experts_per_tok is 0; expected a positive integer"),
        ({"num_experts": None}, "config.json has no 'num_experts'"),
        ({"num_local_experts": 4}, "num_local_experts 4 and num_experts 8 disagree"),
        ({"moe_intermediate_size": None}, "config.json has no 'moe_intermediate_size'"),
        ({"mlp_only_layers": [1]}, "mlp_only_layers [1]: dense layers"),
        ({"decoder_sparse_step": 2}, "decoder_sparse_step 2: only 1 is supported"),
        ({"norm_topk_prob": False}, "norm_topk_prob is False; llama.cpp's qwen3moe always renormalises"),
    ],
)
def test_bad_moe_config_is_named(checkpoint, tmp_path: Path, config: dict[str, object], says: str) -> None:
    d = edited_copy(checkpoint("moe"), tmp_path / "ck", config=config)
    line = convert_fails(d, tmp_path)
    assert "config.json" in line and says in line, line


# --- llama.cpp runs the file: transformers' logits, llama-perplexity's numbers ------------------


@pytest.fixture(scope="module")
def moe_f32(checkpoint, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("moe-f32")
    return {v: to_gguf(checkpoint(v), out / f"{v}-F32.gguf") for v in ("moe", "moe-4")}


@pytest.mark.parametrize("variant", ["moe", "moe-4"])
def test_f32_logits_equal_transformers_qwen3_moe(checkpoint, moe_f32, variant: str) -> None:
    """transformers' Qwen3MoeForCausalLM (5.x: experts fused into 3-D parameters in memory; the
    whole model's forward, no per-Linear hooks) and llama.cpp on ggq's file, token for token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.test_convert import llama_logits

    ckpt_dir = checkpoint(variant)
    ids = list(AutoTokenizer.from_pretrained(ckpt_dir)(TEXT).input_ids)
    model = AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    ours = llama_logits(native.import_llama_cpp(), moe_f32[variant], ids)
    assert np.abs(ours - ref).max() < 1e-3 * float(ref.max() - ref.min())
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_ggq_ppl_equals_llama_perplexity_on_moe(moe_f32, prose: Path) -> None:
    from tests.test_ppl import assert_same_estimate, ggq_ppl, llama_perplexity

    gguf = moe_f32["moe"]
    ours = ggq_ppl(gguf, prose, 128, 4)
    assert ours["n_chunks"] == 4
    assert_same_estimate(ours, llama_perplexity(gguf, prose, 128, 4))


# --- RTN: the types and bytes of llama-quantize, with its MoE rules -----------------------------

MOE_RECIPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "IQ4_NL", "IQ4_XS"]


@pytest.mark.parametrize("file_type", MOE_RECIPES)
@pytest.mark.parametrize("variant", ["moe", "moe-4"])
def test_rtn_file_equals_llama_quantize(
    checkpoint, moe_f32, tmp_path: Path, variant: str, file_type: str
) -> None:
    """llama-quantize on ggq's F32 file (equal to convert_hf_to_gguf.py's, above) and ggq from the
    checkpoint: the same type and bytes for every tensor. Its MoE rules: with 8 experts attn_v and
    attn_k in Q8_0 and attn_output bumped to Q5_K; ffn_down_exps' layer read from the name."""
    ref_path = tmp_path / "ref.gguf"
    cmd = [str(native.tool_path("llama-quantize")), str(moe_f32[variant]), str(ref_path), file_type, "2"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    ours_path = to_gguf(checkpoint(variant), tmp_path / "ours.gguf", file_type)
    ref, ours = read_gguf(ref_path), read_gguf(ours_path)
    assert set(ours.tensors) == set(ref.tensors)
    types = {n: (ours.tensors[n].type_id, t.type_id) for n, t in ref.tensors.items()}
    assert {n: a for n, (a, b) in types.items() if a != b} == {}
    differing = [n for n in ref.tensors if not np.array_equal(ours.tensor_data(n), ref.tensor_data(n))]
    assert differing == []
    assert ours.metadata["general.file_type"] == ref.metadata["general.file_type"]


def test_plan_of_an_8_expert_model_follows_llama_quantize_moe_rules(checkpoint) -> None:
    """The rules by name, beside the byte test: a wrong rule and a wrong reference would have to agree."""
    plan = {
        t.name: t.type
        for t in make_plan(Checkpoint(checkpoint("moe")), ConvertOptions(rc.RecipeOptions("Q4_K_M")))
    }
    assert plan["blk.0.attn_v.weight"] == plan["blk.1.attn_k.weight"] == "Q8_0"
    assert plan["blk.0.attn_output.weight"] == "Q5_K"
    assert plan["blk.0.ffn_gate_inp.weight"] == "F32"
    # use_more_bits(i, 2) is true for layer 1 only
    assert (plan["blk.0.ffn_down_exps.weight"], plan["blk.1.ffn_down_exps.weight"]) == ("Q4_K", "Q6_K")
    assert plan["blk.0.ffn_gate_exps.weight"] == plan["blk.0.ffn_up_exps.weight"] == "Q4_K"


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])  # converts: tests/test_moe_awq.py
def test_calibrated_methods_plan_with_dry_run(checkpoint, tmp_path: Path, method: str) -> None:
    out = tmp_path / "x.gguf"
    args = [
        "convert",
        str(checkpoint("moe")),
        "--type",
        "Q4_K_M",
        "--method",
        method,
        "--dry-run",
        "-o",
        str(out),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "ffn_down_exps" in result.output and not out.exists()


def test_dry_run_prints_the_moe_plan(checkpoint) -> None:
    args = ["convert", str(checkpoint("moe")), "--type", "Q4_K_M", "--dry-run"]
    result = CliRunner().invoke(main, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "blk.1.ffn_down_exps.weight" in result.output and "512 x 256 x 8" in result.output
    assert "total (27 tensors)" in result.output
    rows = json.loads(CliRunner().invoke(main, [*args, "--json"]).stdout)["tensors"]
    by_name = {r["name"]: r for r in rows}
    assert by_name["blk.0.ffn_gate_exps.weight"]["shape"] == [256, 512, 8]
    assert by_name["blk.0.ffn_gate_inp.weight"]["type"] == "F32"


def test_nan_in_an_expert_names_that_expert(checkpoint, tmp_path: Path) -> None:
    from safetensors import safe_open

    src = checkpoint("moe")
    name = "model.layers.1.mlp.experts.6.gate_proj.weight"
    index = json.loads((src / "model.safetensors.index.json").read_text())
    with safe_open(str(src / index["weight_map"][name]), framework="pt") as f:
        w = f.get_tensor(name)
    w[10, 3] = float("nan")
    d = edited_copy(src, tmp_path / "ck", **{name.replace(".", "__"): w})
    line = convert_fails(d, tmp_path)
    assert f"{name}: 1 NaN/Inf values in the checkpoint" in line


def test_moe_file_is_byte_identical_across_runs_and_chunkings(
    checkpoint, tmp_path: Path, monkeypatch
) -> None:
    """Same input, same bytes; and streaming the merged tensors in chunks of 3 experts (3, 3, 2)
    or of one expert (what a 30B-A3B expert of 1.5M values gets under the 1M-value chunk) instead
    of all 8 at once changes nothing."""
    import ggq.convert as conv

    d = checkpoint("moe")
    a = to_gguf(d, tmp_path / "a.gguf", "Q4_K_M").read_bytes()
    assert to_gguf(d, tmp_path / "b.gguf", "Q4_K_M").read_bytes() == a
    monkeypatch.setattr(conv, "CHUNK_VALUES", 3 * 512 * 256)
    assert to_gguf(d, tmp_path / "c.gguf", "Q4_K_M").read_bytes() == a
    monkeypatch.setattr(conv, "CHUNK_VALUES", 1)
    assert to_gguf(d, tmp_path / "e.gguf", "Q4_K_M").read_bytes() == a


@pytest.fixture(scope="module")
def moe_imatrix(moe_f32, tmp_path_factory: pytest.TempPathFactory, calibration_text: Path) -> dict[str, Path]:
    """llama-imatrix's own per-expert importance matrices of the MoE fixtures, from real text."""
    d = tmp_path_factory.mktemp("moe-imatrix")
    text = d / "calib.txt"
    text.write_bytes(calibration_text.read_bytes()[:20000])
    out = {}
    for variant, f32 in moe_f32.items():
        out[variant] = d / f"{variant}.imatrix.gguf"
        cmd = [
            str(native.tool_path("llama-imatrix")),
            "-m",
            str(f32),
            "-f",
            str(text),
            "-o",
            str(out[variant]),
        ]
        subprocess.run(
            [*cmd, "-c", "128", "--chunks", "4", "-t", "2"], check=True, capture_output=True, timeout=300
        )
    return out


@pytest.mark.parametrize("file_type", ["Q4_K_M", "Q4_0", "Q2_K", "IQ4_XS"])
@pytest.mark.parametrize("variant", ["moe", "moe-4"])
def test_rtn_with_imatrix_equals_llama_quantize(
    checkpoint, moe_f32, moe_imatrix, tmp_path: Path, variant: str, file_type: str
) -> None:
    """With llama-imatrix's matrix every expert is quantized under its own importance row, as
    llama-quantize does (experts no calibration token reached: importance 1 in both)."""
    from ggq.imatrix import load_imatrix, read_imatrix

    imatrix = moe_imatrix[variant]
    counts = read_imatrix(imatrix).counts["blk.0.ffn_down_exps.weight"]
    assert counts.shape == (testing.MOE_VARIANTS[variant].num_experts,) and len(set(counts.tolist())) > 1
    ref_path = tmp_path / "ref.gguf"
    cmd = [str(native.tool_path("llama-quantize")), "--imatrix", str(imatrix), str(moe_f32[variant])]
    subprocess.run([*cmd, str(ref_path), file_type, "2"], check=True, capture_output=True, timeout=300)
    opts = ConvertOptions(rc.RecipeOptions(file_type, has_imatrix=True), imatrix=imatrix)
    convert(Checkpoint(checkpoint(variant)), tmp_path / "ours.gguf", opts, load_imatrix(imatrix))
    ref, ours = read_gguf(ref_path), read_gguf(tmp_path / "ours.gguf")
    assert set(ours.tensors) == set(ref.tensors)
    differing = [
        n
        for n, t in ref.tensors.items()
        if ours.tensors[n].type_id != t.type_id or not np.array_equal(ours.tensor_data(n), ref.tensor_data(n))
    ]
    assert differing == []


# --- ggq's other commands on the MoE file ---------------------------------------------------------


@pytest.fixture(scope="module")
def moe_q4(checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return to_gguf(checkpoint("moe"), tmp_path_factory.mktemp("moe-q4") / "moe-Q4_K_M.gguf", "Q4_K_M")


def test_ppl_base_kld_equals_llama_perplexity_on_moe(
    moe_f32, moe_q4: Path, prose: Path, tmp_path: Path
) -> None:
    """Every statistic of llama-perplexity --kl-divergence within one unit of its last printed
    digit, except the PPLs of ~1090 and their errors (random weights, 1024 tokens): 6 printed
    decimals are 10 significant digits, past the agreement of two summation orders (measured:
    PPL 2e-6 apart, 2e-9 relative; its error 1.3e-6, 6e-8 relative), so they get 1e-7 relative."""
    from ggq.eval import llama_tools
    from tests.test_kld import LAST_DIGIT, STATS, ggq_kld

    base_file = llama_tools.kld_base(moe_f32["moe"], prose, tmp_path / "base.kld", n_ctx=128, chunks=4)
    ref = llama_tools.kld_stats(moe_q4, base_file, n_ctx=128, chunks=4)
    doc = ggq_kld(moe_q4, moe_f32["moe"], prose, 128, 4)
    ours = next(r for r in doc["rows"] if r["role"] == "model")["kld"]
    ppls = ("ppl", "ppl_err", "ppl_base", "ppl_base_err")
    allowed = {k: max(LAST_DIGIT[k], 1e-7 * abs(ref[k])) if k in ppls else LAST_DIGIT[k] for k in STATS}
    wrong = {k: (ours[k], ref[k]) for k in STATS if abs(ours[k] - ref[k]) > allowed[k] * (1 + 1e-6)}
    assert wrong == {}
    assert 0 < ours["kld"] < 0.1 and ours["same_top"] < 100


def test_vs_q4_0_on_moe_is_llama_quantizes_file(
    moe_f32, moe_q4: Path, prose: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_kld import ggq_kld

    monkeypatch.setenv("GGQ_CACHE", str(tmp_path / "cache"))
    rows = {r["role"]: r for r in ggq_kld(moe_q4, moe_f32["moe"], prose, 128, 2, "--vs-q4_0")["rows"]}
    assert rows["llama.cpp Q4_0"]["type"] == "Q4_0"
    ref = tmp_path / "ref-q4_0.gguf"
    tool = str(native.tool_path("llama-quantize"))
    subprocess.run(
        [tool, str(moe_f32["moe"]), str(ref), "Q4_0"], check=True, capture_output=True, timeout=300
    )
    (cached,) = (tmp_path / "cache" / "baselines").glob("*.gguf")
    assert cached.read_bytes() == ref.read_bytes()


def test_chat_and_bench_run_the_moe_file(moe_q4: Path) -> None:
    args = ["chat", str(moe_q4), "-p", "Hello", "-n", "8", "--seed", "7", "--no-think", "-c", "256"]
    first, second = CliRunner().invoke(main, args), CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout and first.stdout.strip()
    bench = ["bench", str(moe_q4), "-p", "16", "-n", "4", "-r", "2", "-t", "2", "--json"]
    result = CliRunner().invoke(main, bench)
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert [s["test"] for s in row["speeds"]] == ["pp16", "tg4"] and all(
        s["median"] > 0 for s in row["speeds"]
    )


def test_checkpoint_saved_by_transformers_converts_to_the_same_tensors(
    checkpoint, moe_f32, tmp_path: Path
) -> None:
    """What transformers' own save_pretrained writes (5.x: num_local_experts in config.json, the
    fused in-memory experts split back into per-expert tensors) reads as the hub layout does."""
    from transformers import AutoModelForCausalLM

    src = checkpoint("moe-4")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / name, saved / name)
    config = json.loads((saved / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config.get("norm_topk_prob") is True
    assert config["num_local_experts"] == 4 and "num_experts" not in config  # transformers 5.24's keys
    ours, ref = read_gguf(to_gguf(saved, tmp_path / "saved.gguf")), read_gguf(moe_f32["moe-4"])
    assert sorted(ours.tensors) == sorted(ref.tensors)
    assert [n for n in ref.tensors if not np.array_equal(ours.tensor_data(n), ref.tensor_data(n))] == []
    assert ours.metadata["qwen3moe.expert_count"] == 4 and ours.metadata["qwen3moe.expert_used_count"] == 3
