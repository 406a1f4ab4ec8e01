"""AWQ's per-channel refinement of the grid's scales (awq.refine_scales) and the per-column split
of the output error it steers by (awq.column_errors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ggq.solvers import awq


def _layer_input(seed: int, tokens: int = 2048, n_in: int = 256) -> np.ndarray:
    """Activations with uneven channel magnitudes and a few salient channels, as RMSNorm outputs have."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, n_in)).astype(np.float32) * (1 + 4 * rng.random(n_in)).astype(np.float32)
    x[:, rng.choice(n_in, 6, replace=False)] *= 12
    x += 0.3 * rng.standard_normal((tokens, 1)).astype(np.float32)  # correlated channels: H not diagonal
    return x


def _weights(seed: int, rows: int, n_in: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, n_in)) * 0.05).astype(np.float32)


def test_column_errors_split_the_output_error_exactly() -> None:
    """Each column's share is sum_r e_rj (e H)_rj, computed here in float64 numpy from the decoded
    weights; the shares add up to output_error (to float32 rounding: other order of sums)."""
    x = _layer_input(0)
    h = x.T.astype(np.float64) @ x
    weights = [(_weights(1, 64), "Q4_0"), (_weights(2, 32), "Q4_K")]
    mean_sq = (x**2).mean(0)
    cols = np.exp(np.random.default_rng(3).uniform(-0.5, 0.5, 256)).astype(np.float32)
    shares = awq.column_errors(weights, torch.from_numpy(h.astype(np.float32)), mean_sq, cols)
    ref = np.zeros(256)
    for w, t in weights:
        q = awq.quantized_weights(w * cols, t, (mean_sq / cols**2).astype(np.float32)) / cols
        e = (w - q).astype(np.float64)
        ref += ((e @ h) * e).sum(0)
    np.testing.assert_allclose(shares, ref, rtol=1e-4, atol=1e-9 * ref.max())
    total = awq.output_error(weights, torch.from_numpy(h.astype(np.float32)), mean_sq, cols)
    assert abs(total - float(np.sum(shares))) <= 1e-6 * total


@pytest.mark.parametrize(
    ("seed", "types"), [(0, ("Q4_0",)), (1, ("Q4_K", "Q4_K")), (2, ("Q2_K",)), (3, ("Q3_K", "Q6_K"))]
)
def test_refined_scales_are_never_worse_and_usually_better(seed: int, types: tuple[str, ...]) -> None:
    """Starting from the grid's best, the refinement lowers the output error the grid minimised
    (recomputed here from the returned scales) and never raises it."""
    x = _layer_input(seed)
    h = torch.from_numpy(x.T @ x)
    weights = [(_weights(10 * seed + i, 48 + 16 * i), t) for i, t in enumerate(types)]
    mean_abs, mean_sq = np.abs(x).mean(0).astype(np.float64), (x**2).mean(0)
    channel = np.arange(256)
    grid = awq.search_scales(weights, h, mean_abs, mean_sq, channel, grid=10)
    refined = awq.refine_scales(weights, h, mean_sq, channel, grid)
    assert refined.scales.shape == (256,) and refined.scales.dtype == np.float32
    assert refined.loss == awq.output_error(weights, h, mean_sq, refined.scales[channel])
    assert refined.loss < 0.995 * grid.loss, (refined.loss, grid.loss)
    assert refined.loss_plain == grid.loss_plain and refined.exponents == grid.exponents


def test_refinement_keeps_a_start_it_cannot_improve() -> None:
    """Weights already on the quantizer's grid (Q8_0 of a Q8_0-decoded matrix, no scaling) have no
    error to remove: the refinement returns its start unchanged."""
    x = _layer_input(4)
    h = torch.from_numpy(x.T @ x)
    w = awq.quantized_weights(_weights(5, 32), "Q8_0", None)
    ones = np.ones(256, np.float32)
    start = awq.ScaleResult(ones, (0.0, 0.0), awq.output_error([(w, "Q8_0")], h, (x**2).mean(0), ones), 0.0)
    assert start.loss == 0.0
    assert awq.refine_scales([(w, "Q8_0")], h, (x**2).mean(0), np.arange(256), start) is start


def test_refinement_of_shared_gqa_channels_returns_one_scale_per_kv_channel() -> None:
    """attn_v -> attn_output: 4 query heads of head_dim 64 read 2 KV heads; a refined scale is one
    per v channel (128), and its columns move together."""
    group = next(g for g in awq.QWEN3_GROUPS if g.gqa)
    channel = awq.channel_map(group, 256, n_head=4, n_head_kv=2, head_dim=64)
    x = _layer_input(6)
    x[:, 128:] = x[:, :128]  # the attention output of heads sharing a KV head is correlated
    h = torch.from_numpy(x.T @ x)
    weights = [(_weights(7, 64), "Q4_0")]
    mean_sq = (x**2).mean(0)
    grid = awq.search_scales(weights, h, np.abs(x).mean(0).astype(np.float64), mean_sq, channel, grid=10)
    refined = awq.refine_scales(weights, h, mean_sq, channel, grid)
    assert refined.scales.shape == (128,)
    assert refined.loss <= grid.loss
    assert refined.loss == awq.output_error(weights, h, mean_sq, refined.scales[channel])


def test_refinement_is_deterministic() -> None:
    x = _layer_input(8)
    h = torch.from_numpy(x.T @ x)
    weights = [(_weights(9, 64), "Q4_K")]
    mean_sq = (x**2).mean(0)
    grid = awq.search_scales(
        weights, h, np.abs(x).mean(0).astype(np.float64), mean_sq, np.arange(256), grid=10
    )
    a, b = (awq.refine_scales(weights, h, mean_sq, np.arange(256), grid) for _ in range(2))
    assert a.scales.tobytes() == b.scales.tobytes() and a.loss == b.loss


def test_refinement_does_not_depend_on_torch_threads() -> None:
    """column_errors sums over rows (one thread per column) and output_error in a fixed order:
    the refined scales are the same bits at 1, 2 and 4 torch threads, on 12288 tokens of
    ffn_down-wide input (a plain X^T X that long already differs between thread counts)."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((12288, 512)).astype(np.float32) * (1 + 3 * rng.random(512)).astype(np.float32)
    w = (rng.standard_normal((256, 512)) * 0.02).astype(np.float32)
    mean_sq = (x**2).mean(0)
    before = torch.get_num_threads()
    found = {}
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            h = torch.from_numpy(x.T @ x)  # the same bits: numpy's product, not torch's
            grid = awq.search_scales(
                [(w, "Q4_K")], h, np.abs(x).mean(0).astype(np.float64), mean_sq, np.arange(512), grid=4
            )
            r = awq.refine_scales([(w, "Q4_K")], h, mean_sq, np.arange(512), grid)
            found[n] = (
                r.scales.tobytes(),
                r.loss,
                awq.column_errors([(w, "Q4_K")], h, mean_sq, r.scales).tobytes(),
            )
    finally:
        torch.set_num_threads(before)
    assert found[2] == found[1] and found[4] == found[1]
