"""`ggq convert --method gptq` on Qwen3-MoE: GPTQ per expert on the tokens its (float32) router
sends it, experts with too few tokens on the layer's pooled X^T X (never unquantized), the merged
3-D ffn_*_exps tensors in the recipe's type. Checked with ggml's own dequantizer (the written
slices are the weights the solver carried forward), llama-perplexity (it runs the file) and the
file layout of llama-quantize's RTN of the same recipe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ggq import ggml, qwen3
from ggq.checkpoint import Checkpoint
from ggq.cli import main
from ggq.convert import ConvertOptions, convert, make_plan
from ggq.gguf import read_gguf
from ggq.plan import recipe as rc
from ggq.solvers import layerwise
from ggq.solvers.options import LayerReport, SolverOptions
from tests import ggml_ref
from tests.convert_helpers import layout, solver_gguf
from tests.test_moe import convert_fails, edited_copy

EXPERTS = qwen3.EXPERTS


def solved_layer0(ckpt: Checkpoint, file_type: str, opts: SolverOptions, nsamples: int = 8, seqlen: int = 64):
    """Layer 0 solved on random token windows: (its weights before, after, the result, the report)."""
    hp = ckpt.hparams
    types = {t.name: t.type for t in make_plan(ckpt, ConvertOptions(rc.RecipeOptions(file_type)))}
    tokens = torch.randint(0, hp.n_vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    h = qwen3.embed(ckpt, tokens)
    before = qwen3.load_layer(ckpt, 0)
    w = {k: v.clone() for k, v in before.items()}
    rep = LayerReport(0)
    with torch.no_grad():
        _, result = layerwise.solve_layer(h, w, hp, qwen3.Rope.build(hp, seqlen), types, opts, rep)
    return before, w, result, rep, types


def decoded(result: layerwise.LayerResult, name: str, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """ggml's own dequantization of a written merged tensor, as (n_expert, rows, cols)."""
    data = result.tensors[name]
    return ggml_ref.dequantize(data, ggml.get(type_name).type_id, shape[2]).reshape(shape)


@pytest.mark.parametrize("file_type", ["Q4_K_M", "Q4_0"])
def test_expert_slices_decode_to_the_solvers_weights(checkpoint, file_type: str) -> None:
    """Every expert of every merged tensor, decoded by ggml from the written bytes, is the weight the
    solver carried into the layer's output; each was changed (none left unquantized) and GPTQ's
    output error on the calibration tokens is below RTN's of the same type for each tensor."""
    ckpt = Checkpoint(checkpoint("moe-4"))
    hp = ckpt.hparams
    before, after, result, rep, types = solved_layer0(ckpt, file_type, SolverOptions(method="gptq"))
    assert sum(rep.expert_tokens) == 8 * 64 * hp.n_expert_used and rep.expert_fallbacks == []
    for name in EXPERTS:
        shape = tuple(after[name].shape)
        assert shape[0] == hp.n_expert
        ours = decoded(result, name, types[f"blk.0.{name}.weight"], shape)
        np.testing.assert_array_equal(ours, after[name].numpy())
        for e in range(hp.n_expert):
            assert not np.array_equal(ours[e], before[name][e].numpy()), f"{name} expert {e} unquantized"
        rtn_err, gptq_err = rep.errors[name]
        assert gptq_err < 0.8 * rtn_err, (name, rep.errors[name])
    assert torch.equal(after[qwen3.ROUTER], before[qwen3.ROUTER])  # the router is kept as it is


def test_experts_below_the_threshold_fall_back_to_the_pooled_hessian(checkpoint) -> None:
    """Too few routed tokens: the expert is still quantized by GPTQ (its bytes decode to the solver's
    weights), on all of the layer's tokens; an expert with enough tokens is solved on its own."""
    ckpt = Checkpoint(checkpoint("moe-4"))
    hp = ckpt.hparams
    own = solved_layer0(ckpt, "Q4_K_M", SolverOptions(method="gptq"))
    counts = own[3].expert_tokens
    threshold = sorted(counts)[1] + 1  # the two least-routed experts fall back (more on a tie)
    _, after, result, rep, types = solved_layer0(
        ckpt, "Q4_K_M", SolverOptions(method="gptq", expert_min_tokens=threshold)
    )
    low = sorted(e for e in range(hp.n_expert) if counts[e] < threshold)
    assert rep.expert_fallbacks == low and 2 <= len(low) < hp.n_expert
    for name in EXPERTS:
        shape = tuple(after[name].shape)
        ours = decoded(result, name, types[f"blk.0.{name}.weight"], shape)
        np.testing.assert_array_equal(ours, after[name].numpy())
        theirs = decoded(own[2], name, types[f"blk.0.{name}.weight"], shape)
        for e in range(hp.n_expert):
            same = np.array_equal(ours[e], theirs[e])
            # gate/up of an expert solved on its own tokens are the same either way; down reads
            # the layer's attention output, the same here, so only the fallen-back experts differ
            assert same == (e not in low), (name, e)


def test_routing_weighted_hessian_changes_the_experts(checkpoint) -> None:
    ckpt = Checkpoint(checkpoint("moe-4"))
    plain = solved_layer0(ckpt, "Q4_K_M", SolverOptions(method="gptq"))[2]
    weighted = solved_layer0(ckpt, "Q4_K_M", SolverOptions(method="gptq", expert_weighting="weighted"))[2]
    assert all(not np.array_equal(plain.tensors[n], weighted.tensors[n]) for n in EXPERTS)
    assert np.array_equal(plain.tensors["attn_q"], weighted.tensors["attn_q"])


@pytest.fixture(scope="module")
def moe_gptq(checkpoint, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("moe-gptq")
    ckpt_dir = checkpoint("moe")
    rtn = out / "rtn.gguf"
    convert(Checkpoint(ckpt_dir), rtn, ConvertOptions(rc.RecipeOptions("Q4_K_M")))
    return {
        "rtn": rtn,
        "gptq": solver_gguf(ckpt_dir, out / "a.gguf", "Q4_K_M", "gptq", nsamples=8, seqlen=128),
        "again": solver_gguf(ckpt_dir, out / "b.gguf", "Q4_K_M", "gptq", nsamples=8, seqlen=128),
    }


def test_gptq_moe_file_has_the_rtn_layout_and_is_deterministic(moe_gptq: dict[str, Path]) -> None:
    assert layout(moe_gptq["gptq"]) == layout(moe_gptq["rtn"])
    assert moe_gptq["gptq"].read_bytes() == moe_gptq["again"].read_bytes()
    ours, rtn = read_gguf(moe_gptq["gptq"]), read_gguf(moe_gptq["rtn"])
    for i in range(2):
        for n in EXPERTS:
            name = f"blk.{i}.{n}.weight"
            assert not np.array_equal(ours.tensor_data(name), rtn.tensor_data(name)), name
        name = f"blk.{i}.{qwen3.ROUTER}.weight"
        assert np.array_equal(ours.tensor_data(name), rtn.tensor_data(name))  # F32, as the checkpoint's
    assert ours.metadata["ggq.method"] == "gptq"


def test_llama_perplexity_runs_the_gptq_moe_file(moe_gptq: dict[str, Path], prose: Path) -> None:
    from tests.test_ppl import llama_perplexity

    ppl, err = llama_perplexity(moe_gptq["gptq"], prose, 128, 4)
    assert np.isfinite(ppl) and ppl > 1 and err > 0


def test_cli_reports_tokens_per_expert(checkpoint, tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    args = ["convert", str(checkpoint("moe")), "--type", "Q8_0", "--method", "gptq", "-o", str(out)]
    result = CliRunner().invoke(main, [*args, "--nsamples", "2", "--seqlen", "64", "--json"])
    assert result.exit_code == 0, result.output
    layers = json.loads(result.stdout)["layers"]
    assert [sum(r["expert_tokens"]) for r in layers] == [2 * 64 * 2] * 2
    assert all(r["expert_fallbacks"] == list(range(8)) for r in layers)  # 32 tokens each < n_embd 256


@pytest.mark.parametrize("method", ["gptq", "awq", "awq+gptq"])
def test_router_routing_no_token_is_one_line(checkpoint, tmp_path: Path, method: str) -> None:
    """A router whose logits overflow (softmax NaN): calibration reaches no expert of the layer."""
    huge = torch.full((8, 256), 3e38, dtype=torch.bfloat16)
    d = edited_copy(checkpoint("moe"), tmp_path / "ck", **{"model__layers__0__mlp__gate__weight": huge})
    line = convert_fails(d, tmp_path, "--method", method, "--nsamples", "2", "--seqlen", "64")
    assert "blk.0.ffn_gate_inp.weight routes" in line and "to no expert" in line


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--method", "gptq", "--distill", "2"], "--distill: not yet"),
    ],
)
def test_what_is_not_done_for_moe_says_not_yet(
    checkpoint, tmp_path: Path, args: list[str], says: str
) -> None:
    line = convert_fails(checkpoint("moe"), tmp_path, *[a.format(tmp=tmp_path) for a in args])
    assert says in line, line
