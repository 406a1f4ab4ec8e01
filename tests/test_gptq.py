"""GPTQ targeting ggml blocks: the bytes it writes decode (in ggml itself) to exactly the weights
it ended with, and it beats RTN and imatrix-RTN on the layer output error with real activations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ggq import calib, ggml, qwen3
from ggq.checkpoint import Checkpoint
from ggq.solvers.gptq import SolverError, Target, gptq, supported_types
from tests import ggml_ref


def _synthetic(rows: int = 48, cols: int = 512, n: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, cols)).astype(np.float32) * (1 + 3 * rng.random(cols)).astype(np.float32)
    x[:, :3] *= 20  # outlier channels, as real activations have
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    return w, x.T.astype(np.float64) @ x, x


@pytest.mark.parametrize("type_name", supported_types())
def test_written_bytes_decode_to_the_solver_weights(type_name: str) -> None:
    """The error feedback used the values the GGUF will decode to: ggml's own dequantization of
    the bytes equals the solver's final weights exactly."""
    w, h, _ = _synthetic()
    result = gptq(w, h, Target(type_name))
    decoded = ggml_ref.dequantize(result.data, ggml.get(type_name).type_id, w.shape[1])
    assert np.array_equal(decoded, result.weights)
    assert result.data.shape == (w.shape[0], ggml.quantize(w, type_name).shape[1])  # same size as RTN


def _rel_err(x: np.ndarray, w: np.ndarray, q: np.ndarray) -> float:
    return float(np.linalg.norm(x @ (w - q).T) / np.linalg.norm(x @ w.T))


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


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_K", "Q3_K", "Q2_K"])
def test_gptq_beats_rtn_and_imatrix_on_real_activations(micro_layer, type_name: str) -> None:
    w, h, x = micro_layer
    result = gptq(w, h, Target(type_name))
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
