"""AWQ: scales folded exactly into Qwen3 (checked against transformers on the original checkpoint),
and `ggq convert --method awq` files judged by llama.cpp's own KL-divergence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ggq import ggml, qwen3
from ggq.checkpoint import Checkpoint
from ggq.cli import main
from ggq.convert import CalibOptions, ConvertError, ConvertOptions, convert
from ggq.eval import llama_tools
from ggq.gguf import read_gguf
from ggq.plan import recipe as rc
from ggq.solvers import awq
from ggq.solvers.gptq import supported_types
from tests.convert_helpers import check_trio, micro_trio, solver_gguf
from tests.test_qwen3_forward import logits


def _transformers_logits(ckpt_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(tokens).logits


def _folded_logits(ckpt: Checkpoint, tokens: torch.Tensor, seed: int) -> torch.Tensor:
    """ggq's forward with arbitrary positive scales (0.1x .. 10x) folded into every group of every layer."""
    hp = ckpt.hparams
    gen = torch.Generator().manual_seed(seed)
    rope = qwen3.Rope.build(hp, tokens.shape[1])
    with torch.no_grad():
        h = qwen3.embed(ckpt, tokens)
        for i in range(hp.n_layer):
            w = qwen3.load_layer(ckpt, i)
            for group in awq.QWEN3_GROUPS:
                n_in = w[group.linears[0]].shape[1]
                channel = awq.channel_map(group, n_in, hp.n_head, hp.n_head_kv, hp.head_dim)
                n_ch = w[group.prev].shape[0]
                scales = torch.exp((torch.rand(n_ch, generator=gen) * 2 - 1) * np.log(10.0))
                assert int(channel.max()) + 1 == n_ch
                awq.fold(w, group, scales, channel)
            h = qwen3.layer_forward(h, w, hp, rope)
        return logits(ckpt, h)


@pytest.mark.parametrize("variant", ["tied", "untied", "odd-head-dim"])
def test_folding_any_scales_keeps_the_model(checkpoint, variant: str) -> None:
    """Every fold is exact (GQA v -> o included): the folded model's logits equal transformers'
    on the original checkpoint."""
    ckpt_dir = checkpoint(variant)
    ckpt = Checkpoint(ckpt_dir)
    assert ckpt.hparams.n_head != ckpt.hparams.n_head_kv
    tokens = torch.randint(0, ckpt.hparams.n_vocab, (2, 29), generator=torch.Generator().manual_seed(3))
    ref = _transformers_logits(ckpt_dir, tokens)
    ours = _folded_logits(ckpt, tokens, seed=7)
    assert (ours - ref).abs().max().item() < 1e-4 * float(ref.max() - ref.min())


def test_gqa_channel_map_shares_a_v_channel_across_its_query_heads() -> None:
    group = next(g for g in awq.QWEN3_GROUPS if g.prev == "attn_v")
    m = awq.channel_map(group, 8 * 4, n_head=8, n_head_kv=2, head_dim=4)
    assert m.reshape(8, 4).tolist() == [[0, 1, 2, 3]] * 4 + [[4, 5, 6, 7]] * 4


def test_search_is_never_worse_than_unscaled() -> None:
    """alpha = 0 is importance-weighted RTN; the search keeps it unless a scaling is better."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2048, 256)).astype(np.float32) * (1 + 4 * rng.random(256)).astype(np.float32)
    x[:, :4] *= 15  # salient channels
    w = (rng.standard_normal((64, 256)) * 0.05).astype(np.float32)
    h = torch.from_numpy(x.T @ x)
    found = awq.search_scales(
        [(w, "Q4_0"), (w[:32], "Q4_K")],
        h,
        np.abs(x).mean(0).astype(np.float64),
        (x**2).mean(0),
        np.arange(256),
    )
    assert found.exponents[0] > 0 and found.loss < 0.97 * found.loss_plain
    assert found.scales.shape == (256,) and found.scales.dtype == np.float32
    unscaled = awq.output_error([(w, "Q4_0"), (w[:32], "Q4_K")], h, (x**2).mean(0), np.ones(256, np.float32))
    assert found.loss_plain == unscaled


def _salient_problem(seed: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2048, 256)).astype(np.float32) * (1 + 4 * rng.random(256)).astype(np.float32)
    x[:, :4] *= 15  # salient channels
    w = (rng.standard_normal((64, 256)) * 0.05).astype(np.float32)
    return x, w, torch.from_numpy(x.T @ x)


def test_ranked_scales_are_sorted_and_start_with_the_search_result() -> None:
    x, w, h = _salient_problem(2)
    args = ([(w, "Q4_0")], h, np.abs(x).mean(0).astype(np.float64), (x**2).mean(0), np.arange(256))
    ranked = awq.ranked_scales(*args)
    assert len(ranked) == 41  # unscaled + 20 alphas + 20 duo alphas
    assert [r.loss for r in ranked] == sorted(r.loss for r in ranked)
    best = awq.search_scales(*args)
    assert best.exponents == ranked[0].exponents and np.array_equal(best.scales, ranked[0].scales)


def test_candidates_scored_on_a_row_sample_are_llama_cpps_error_of_those_rows() -> None:
    """With ``rows`` (SolverOptions.search_rows) a wide linear's candidates are scored on every
    (rows // search_rows)-th row: each candidate's loss is, to float32 rounding, the output error
    tr(E H E^T) of those rows alone computed in float64 from llama.cpp's own imatrix quantization
    (importance: the scaled input's mean square); a linear under 2 x rows rows counts every row.
    The candidates themselves (their scales) are those of the full weights."""
    from tests import ggml_ref

    rng = np.random.default_rng(5)
    x = (rng.standard_normal((2048, 256)) * (0.2 + 3 * rng.random(256))).astype(np.float32)
    h = x.T.astype(np.float64) @ x
    wide = (rng.standard_normal((700, 256)) * 0.05).astype(np.float32)
    narrow = (rng.standard_normal((90, 256)) * 0.05).astype(np.float32)
    mean_abs, mean_sq = np.abs(x).mean(0).astype(np.float64), (x**2).mean(0)
    weights = [(wide, "Q4_K"), (narrow, "Q4_0")]
    ht = torch.from_numpy(h.astype(np.float32))
    ranked = awq.ranked_scales(weights, ht, mean_abs, mean_sq, np.arange(256), 4, rows=50)
    full = awq.ranked_scales(weights, ht, mean_abs, mean_sq, np.arange(256), 4)
    assert sorted(r.exponents for r in ranked) == sorted(r.exponents for r in full)
    for r in ranked:
        s = r.scales.astype(np.float64)
        imp = (mean_sq / s**2).astype(np.float32)
        want = 0.0
        for w, t in ((wide[::14], "Q4_K"), (narrow, "Q4_0")):  # 700 // 50 = 14; 90 < 100: all rows
            tid = ggml.get(t).type_id
            ws = np.ascontiguousarray((w * s).astype(np.float32))
            q = ggml_ref.dequantize(ggml_ref.quantize(ws, tid, imp), tid, 256).astype(np.float64) / s
            e = w.astype(np.float64) - q
            want += float(np.sum((e @ h) * e))
        assert r.loss == pytest.approx(want, rel=1e-3)


def test_block_choice_follows_the_block_error_not_the_linear_one() -> None:
    """With the linear output error as the block error it keeps the search's best; with an error
    that only the unscaled candidate makes small, it picks that one."""
    x, w, h = _salient_problem(3)
    mean_sq = (x**2).mean(0)
    ranked = awq.ranked_scales(
        [(w, "Q4_0")], h, np.abs(x).mean(0).astype(np.float64), mean_sq, np.arange(256)
    )
    assert ranked[0].exponents != (0.0, 0.0)
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)

    def linear(qs: list[torch.Tensor]) -> float:
        return float(((xt @ (wt - qs[0]).T) ** 2).sum())

    top = ranked[:5]
    assert awq.block_choice(top, [(w, "Q4_0")], mean_sq, np.arange(256), linear) is top[0]
    plain_q = torch.from_numpy(awq.quantized_weights(w, "Q4_0", mean_sq))
    unscaled = next(r for r in ranked if r.exponents == (0.0, 0.0))

    def only_plain(qs: list[torch.Tensor]) -> float:
        return float((qs[0] - plain_q).abs().sum())

    assert awq.block_choice(ranked, [(w, "Q4_0")], mean_sq, np.arange(256), only_plain) is unscaled


def test_clipped_choice_scores_each_candidate_after_its_clip_search() -> None:
    """Its loss is the clipped error of the chosen scales: never above that candidate's unclipped
    error, and the least over the candidates of the same clipped measure."""
    x, w, h = _salient_problem(4)
    mean_sq, ch = (x**2).mean(0), np.arange(256)
    weights = [(w, "Q4_K")]
    ranked = awq.ranked_scales(weights, h, np.abs(x).mean(0).astype(np.float64), mean_sq, ch)
    top = ranked[:3]
    found = awq.clipped_choice(top, weights, h, mean_sq, ch)
    chosen = next(c for c in top if np.array_equal(c.scales, found.scales))
    assert found.loss <= chosen.loss
    for c in top:
        assert found.loss <= awq.clipped_choice([c], weights, h, mean_sq, ch).loss


def test_refit_norm_undoes_a_per_channel_distortion() -> None:
    """Quantized weights off by a factor per input channel: the least-squares refit finds it."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4096, 64)).astype(np.float32)
    w1, w2 = (rng.standard_normal((r, 64)).astype(np.float32) for r in (32, 16))
    c = (0.8 + 0.4 * rng.random(64)).astype(np.float32)
    u = awq.refit_norm([(w1, w1 / c), (w2, w2 / c)], torch.from_numpy(x.T @ x), ridge=0.0)
    np.testing.assert_allclose(u, c, rtol=1e-4)


@pytest.fixture(scope="module")
def micro_files(qwen3_micro: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return micro_trio(qwen3_micro, tmp_path_factory.mktemp("awq"), "awq", "Q4_0")


def test_awq_file_has_rtn_layout_and_provenance(micro_files: dict[str, Path]) -> None:
    changed = check_trio(micro_files, "awq")
    assert "blk.3.attn_norm.weight" in changed and "blk.3.ffn_norm.weight" in changed  # scales folded in
    # the tied head by importance-weighted RTN (solvers/head.py); q/k norms are not folded into
    assert "token_embd.weight" in changed and "blk.3.attn_q_norm.weight" not in changed


def test_awq_is_closer_to_f32_than_rtn(micro_files: dict[str, Path], heldout: Path, tmp_path: Path) -> None:
    """Judged by llama.cpp itself: llama-perplexity's KL-divergence on held-out text (ggq's RTN
    file is byte-identical to llama-quantize's Q4_0)."""
    text = heldout
    base = llama_tools.kld_base(micro_files["F32"], text, tmp_path / "base.kld", chunks=12)
    rtn, ours = (llama_tools.kld(micro_files[k], base, chunks=12) for k in ("rtn", "awq"))
    assert ours["kld"] < 0.95 * rtn["kld"], (ours, rtn)
    assert ours["top1"] >= rtn["top1"] - 0.5


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_awq_is_deterministic(checkpoint, tmp_path: Path, method: str) -> None:
    ckpt_dir = checkpoint("untied")
    a = solver_gguf(ckpt_dir, tmp_path / "a.gguf", "Q4_0", method, nsamples=4, seqlen=64)
    b = solver_gguf(ckpt_dir, tmp_path / "b.gguf", "Q4_0", method, nsamples=4, seqlen=64)
    assert a.read_bytes() == b.read_bytes()
    assert read_gguf(a).metadata["ggq.method"] == method


def test_float_linears_are_folded_and_stay_float(checkpoint, tmp_path: Path) -> None:
    """attn_q in F16 still carries the attn_norm scales (its folded weights written as F16)."""
    ckpt_dir = checkpoint("tied")
    opts = rc.RecipeOptions("Q8_0", tensor_types=(("attn_q", "F16"),))
    out = tmp_path / "mixed.gguf"
    convert(
        Checkpoint(ckpt_dir), out, ConvertOptions(opts, method="awq", cal=CalibOptions(nsamples=4, seqlen=64))
    )
    g = read_gguf(out)
    q = g.tensor_data("blk.0.attn_q.weight").view(np.float16).astype(np.float32).reshape(64, 64)
    norm = g.tensor_data("blk.0.attn_norm.weight").view(np.float32)
    ckpt = Checkpoint(ckpt_dir)
    ref = ckpt.load("blk.0.attn_q.weight") * ckpt.load("blk.0.attn_norm.weight")[None, :]
    np.testing.assert_allclose(q * norm[None, :], ref, rtol=2e-3, atol=1e-5)


def test_awq_gptq_untargetable_type_is_one_line(qwen3_micro: Path, tmp_path: Path) -> None:
    """Checked before any calibration work (qwen3-micro's 256-wide rows take 256-blocks as is)."""
    unsupported = sorted(set(ggml.FORMATS) - set(ggml.FLOAT_TYPES) - set(supported_types()))
    if not unsupported:
        pytest.skip("GPTQ targets every block type")
    out = tmp_path / "x.gguf"
    args = ["convert", str(qwen3_micro), "-o", str(out), "--method", "awq+gptq", "--pure"]
    result = CliRunner().invoke(main, [*args, "--type", unsupported[0]])
    assert result.exit_code == 2 and f"GPTQ cannot target {unsupported[0]}" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_awq_bad_input_is_one_line(checkpoint, tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    short = tmp_path / "short.txt"
    short.write_text("a few words " * 30)
    result = CliRunner().invoke(
        main, ["convert", str(checkpoint("tied")), "-o", str(out), "--method", "awq", "--calib", str(short)]
    )
    assert result.exit_code == 2 and "shorter than one window of 512" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()
    with pytest.raises(ConvertError, match="--method awq-ish"):
        convert(Checkpoint(checkpoint("tied")), out, ConvertOptions(method="awq-ish"))


def test_clip_search_only_keeps_a_clip_that_lowers_the_output_error() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2048, 64)).astype(np.float32)
    w = (rng.standard_normal((16, 64)) * 0.05).astype(np.float32)
    w[:, ::32] *= 12  # one outlier per block dominates the block's scale
    h = torch.from_numpy(x.T @ x)
    imp = (x**2).mean(0)

    def err(v: np.ndarray) -> float:
        e = w - awq.quantized_weights(v, "Q4_0", imp)
        return float(np.sum((e @ (x.T @ x)) * e))

    clipped = awq.clip_search(w, "Q4_0", imp, h)
    assert err(clipped) <= err(w)
    assert np.all(np.abs(clipped) <= np.abs(w))


def test_clip_error_pairwise_contraction_is_the_three_operand_einsum() -> None:
    """clip_search contracts e H_b e^T in two einsum calls for speed; its choices (and the files)
    stay those of the three-operand einsum only while the sums are the same bit for bit."""
    gen = torch.Generator().manual_seed(5)
    for rows, nb in ((256, 24), (768, 8), (128, 8)):
        e = torch.randn(rows, nb, 32, generator=gen) * 0.01  # (rows, nb, unit)
        x = torch.randn(nb, 256, 32, generator=gen)
        hb = x.transpose(1, 2) @ x  # (nb, unit, unit)
        pairwise = torch.einsum("rbj,rbj->rb", torch.einsum("rbi,bij->rbj", e, hb), e)
        assert torch.equal(pairwise, torch.einsum("rbi,bij,rbj->rb", e, hb, e))
