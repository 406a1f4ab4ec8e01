"""GPTQ targeting ggml blocks: the bytes it writes decode (in ggml itself) to exactly the weights
it ended with, with and without act-order, and it beats RTN and imatrix-RTN on the layer output
error with correlated synthetic and with real activations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ggq import calib, ggml, qwen3
from ggq.checkpoint import Checkpoint
from ggq.solvers.gptq import GPTQResult, SolverError, Target, _Grid, gptq, supported_types
from tests import ggml_ref


def _synthetic(rows: int = 48, cols: int = 512, n: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, cols)).astype(np.float32) * (1 + 3 * rng.random(cols)).astype(np.float32)
    x[:, :3] *= 20  # outlier channels, as real activations have
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    return w, x.T.astype(np.float64) @ x, x


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("type_name", supported_types())
def test_written_bytes_decode_to_the_solver_weights(type_name: str, act_order: bool) -> None:
    """The error feedback used the values the GGUF will decode to: ggml's own dequantization of
    the bytes equals the solver's final weights exactly (act-order too: it packs every code
    back into its own column's block)."""
    w, h, _ = _synthetic()
    result = gptq(w, h, Target(type_name), act_order=act_order)
    decoded = ggml_ref.dequantize(result.data, ggml.get(type_name).type_id, w.shape[1])
    assert np.array_equal(decoded.view(np.uint32), result.weights.view(np.uint32))  # -0.0 included
    assert result.data.shape == (w.shape[0], ggml.quantize(w, type_name).shape[1])  # same size as RTN


@pytest.mark.parametrize("type_name", supported_types())
def test_every_code_of_a_fit_decodes_in_ggml_to_its_level(type_name: str) -> None:
    """The nearest-value search reads ``levels``: each code's entry must be what ggml decodes
    from a block whose codes are all that code, for every row and sub-block."""
    target = Target(type_name)
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((8, target.group)) * rng.uniform(0.01, 2, (8, 1))).astype(np.float32)
    w[0] = 0  # an all-zero block: every code decodes to 0
    w[1] = np.abs(w[1]) + 1  # all positive: Q4_1/Q5_1/K-quant mins at work
    fit = target.fit(w, rng.uniform(0.1, 10, target.group).astype(np.float32))
    for c in range(target.n_codes):
        data = target.pack(fit, np.full(w.shape, c, np.uint8))
        decoded = ggml_ref.dequantize(data, ggml.get(type_name).type_id, target.group)  # (8, group)
        want = np.repeat(fit.levels[:, :, c].T, target.sub, axis=1)  # (8, group)
        assert np.array_equal(decoded.view(np.uint32), want.view(np.uint32)), c


def _argmin_nearest(levels: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The plain rule: the first code of least float32 |level - x| over all codes."""
    return torch.argmin((torch.from_numpy(levels.T) - torch.from_numpy(x)).abs(), dim=0).numpy()


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0", "IQ4_NL", "Q3_K", "Q6_K"])
def test_windowed_nearest_equals_argmin_over_all_codes(type_name: str) -> None:
    """The solver looks at five codes around x's position on the grid; it must pick what an argmin
    over all codes picks, also for ties at midpoints, flat rows, tiny steps and far outliers."""
    target = Target(type_name)
    rng = np.random.default_rng(5)
    rows = 400
    w = (rng.standard_normal((rows, target.group)) * 0.05).astype(np.float32)
    w[:20] = 0  # flat rows
    w[20:40] *= 1e-30  # subnormal steps
    w[40:60] += 3  # far from zero (mins)
    fit = target.fit(w, None)
    for levels in fit.levels:  # (rows, n_codes) of each sub-block
        grid = _Grid.of(levels, target.unit)
        x = w[:, 0] + rng.standard_normal(rows).astype(np.float32) * np.float32(0.05)
        x[60:80] = (levels[60:80, 3] + levels[60:80, 4]) / 2  # midpoints: ties keep the lower code
        x[80:100] = levels[80:100, 5]  # exactly on a level
        x[100:120] *= 1e6  # far outside the grid
        x[120:140] = levels[120:140, -1] + (levels[120:140, -1] - levels[120:140, -2]) * 1e4
        codes, values = grid.nearest(x, target.unit, target.uniform)
        want = _argmin_nearest(levels, x)
        assert np.array_equal(codes, want)
        assert np.array_equal(values.view(np.uint32), levels[np.arange(rows), want].view(np.uint32))


def _reference_gptq(w: np.ndarray, h: np.ndarray, target: Target, block: int) -> GPTQResult:
    """The textbook loop (column by column, argmin over all codes, row-major updates) the solver
    was restructured from; it must give the same bytes and weights."""
    rows, cols = w.shape
    W = torch.from_numpy(w.copy())
    H = torch.from_numpy(h.copy())
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    importance = torch.diag(H).to(torch.float32).numpy()
    damp = 0.01
    H += damp * float(torch.diag(H).mean()) * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Hinv = Hinv.to(torch.float32)
    Q, codes, fits = torch.zeros_like(W), np.zeros((rows, cols), np.uint8), []
    block = max(block // target.group, 1) * target.group
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        W1, Hinv1 = W[:, b0:b1].clone(), Hinv[b0:b1, b0:b1]
        Err1 = torch.zeros_like(W1)
        for i in range(b1 - b0):
            col = b0 + i
            g0 = col - col % target.group
            if col == g0:
                group_w = np.ascontiguousarray(W1[:, i : i + target.group].numpy())
                fits.append(target.fit(group_w, importance[g0 : g0 + target.group]))
            levels = torch.from_numpy(fits[-1].levels[(col - g0) // target.sub].T)  # (n_codes, rows)
            x = W1[:, i]
            c = torch.argmin((levels - x).abs(), dim=0)
            q = levels.gather(0, c[None])[0]
            codes[:, col], Q[:, col] = c.numpy(), q
            err = (x - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, b1:] -= Err1 @ Hinv[b0:b1, b1:]
    g = target.group
    data = np.concatenate([target.pack(f, codes[:, k * g : (k + 1) * g]) for k, f in enumerate(fits)], axis=1)
    return GPTQResult(data, Q.numpy(), damp)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q5_1", "Q8_0", "IQ4_NL", "Q2_K", "Q4_K", "Q6_K"])
def test_solver_equals_the_textbook_loop(type_name: str) -> None:
    """The fast loop (transposed columns, windowed nearest search) changes no result."""
    w, h, _ = _synthetic(rows=24)
    h[7, :] = h[:, 7] = 0  # a dead input channel
    target = Target(type_name)
    for block in (128, 256):
        ours, ref = gptq(w, h, target, block=block), _reference_gptq(w, h, target, block)
        assert np.array_equal(ours.data, ref.data)
        assert np.array_equal(ours.weights.view(np.uint32), ref.weights.view(np.uint32))


def _rel_err(x: np.ndarray, w: np.ndarray, q: np.ndarray) -> float:
    return float(np.linalg.norm(x @ (w - q).T) / np.linalg.norm(x @ w.T))


def _correlated(rows: int = 32, cols: int = 512, n: int = 2048) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activations with a shared low-rank part (correlated columns), varied scales and outliers."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((n, cols)).astype(np.float32)
    shared = rng.standard_normal((n, 16)).astype(np.float32)  # (n, 16) factors every column mixes
    z += shared @ rng.standard_normal((16, cols)).astype(np.float32) / 2
    x = z * (1 + 3 * rng.random(cols)).astype(np.float32)
    x[:, rng.choice(cols, 6, replace=False)] *= 20  # outlier channels
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    return w, x.T.astype(np.float64) @ x, x


@pytest.mark.parametrize("type_name", supported_types())
def test_gptq_beats_rtn_on_correlated_data_and_act_order_beats_gptq(type_name: str) -> None:
    """Output error tr(E H E^T): GPTQ below RTN and imatrix-RTN for every target. Act-order (static
    groups) is lower still on this data, for every type (measured: 0.76-0.92 of in-order GPTQ)."""
    w, h, x = _correlated()
    rtn = ggml.dequantize(ggml.quantize(w, type_name), type_name, w.shape[1])
    imatrix = np.diag(h).astype(np.float32)
    rtn_im = ggml.dequantize(ggml.quantize(w, type_name, imatrix), type_name, w.shape[1])
    e_gptq = _rel_err(x, w, gptq(w, h, Target(type_name)).weights)
    e_act = _rel_err(x, w, gptq(w, h, Target(type_name), act_order=True).weights)
    e_rtn, e_im = _rel_err(x, w, rtn), _rel_err(x, w, rtn_im)
    assert e_act < e_gptq < 0.8 * min(e_im, e_rtn), (e_act, e_gptq, e_im, e_rtn)


@pytest.fixture(scope="module")
def micro_layer(qwen3_micro: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layer 2's ffn_down weight and its real input activations on calibration text."""
    ckpt = Checkpoint(qwen3_micro)
    windows = calib.sample_windows(
        qwen3_micro / "tokenizer.json", calib.default_text(), nsamples=8, seqlen=128
    )
    tokens = torch.from_numpy(windows.tokens)
    hp = ckpt.hparams
    rope = qwen3.Rope.build(hp, tokens.shape[1])
    with torch.no_grad():
        h = qwen3.embed(ckpt, tokens)
        for i in range(2):
            h = qwen3.layer_forward(h, qwen3.load_layer(ckpt, i), hp, rope)
        w2 = qwen3.load_layer(ckpt, 2)
        h = h + qwen3.attention_core(qwen3.attention_input(h, w2, hp), w2, hp, rope) @ w2["attn_output"].T
        x = qwen3.mlp_core(qwen3.mlp_input(h, w2, hp), w2).reshape(-1, hp.n_ff).numpy()  # (tokens, n_ff)
    return w2["ffn_down"].numpy(), x.T.astype(np.float64) @ x, x


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_K", "Q3_K", "Q2_K", "IQ4_NL", "Q5_1"])
def test_gptq_beats_rtn_and_imatrix_on_real_activations(micro_layer, type_name: str, act_order: bool) -> None:
    w, h, x = micro_layer
    result = gptq(w, h, Target(type_name), act_order=act_order)
    rtn = ggml.dequantize(ggml.quantize(w, type_name), type_name, w.shape[1])
    imatrix = np.diag(h).astype(np.float32)
    rtn_im = ggml.dequantize(ggml.quantize(w, type_name, imatrix), type_name, w.shape[1])
    e_gptq, e_rtn, e_im = _rel_err(x, w, result.weights), _rel_err(x, w, rtn), _rel_err(x, w, rtn_im)
    assert e_gptq < 0.9 * e_im and e_im <= e_rtn, (e_gptq, e_im, e_rtn)


def test_singular_hessian_is_damped_not_nan() -> None:
    w, _, x = _synthetic(cols=256)
    h = x[:8].T.astype(np.float64) @ x[:8]  # rank 8: singular
    h[5, :] = h[:, 5] = 0  # a dead input channel
    result = gptq(w, h, Target("Q4_K"), damp=1e-6)
    assert np.isfinite(result.weights).all() and result.damp >= 1e-6


def test_bad_shapes_and_types_are_named() -> None:
    w, h, _ = _synthetic(cols=96)
    with pytest.raises(SolverError, match="96 columns are not a whole number of 256-blocks"):
        gptq(w, h, Target("Q4_K"))
    with pytest.raises(SolverError, match="GPTQ cannot target IQ4_XS yet"):
        Target("IQ4_XS")
    with pytest.raises(SolverError, match="Q4_0: 40 columns are not a whole number of 32-blocks"):
        gptq(w[:, :40], h[:40, :40], Target("Q4_0"), act_order=True)
