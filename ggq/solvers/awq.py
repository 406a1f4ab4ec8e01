"""AWQ: activation-aware per-channel scales, searched with the target ggml block quantizer in the
loop, folded exactly into the model (Lin et al., 2023).

A linear's output ``X W^T`` is unchanged when input channel j is divided by s_j and weight
column j multiplied by s_j. Where the division can be absorbed by the tensor that produces X (an
RMSNorm weight, or the rows of a linear with nothing non-linear before the consumer), the model
computes the same function, but the quantizer sees ``W * s``: the columns of salient channels
(large mean |x|) are magnified and keep more relative precision. The scales are
``s = mean|x| ** alpha`` (normalised), alpha picked on a grid to minimise the output error of all
the linears reading X, each quantized with its own ggml block type and the importance (mean
square) of the scaled input, as the final encoder will quantize it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ggq import ggml


@dataclass(frozen=True)
class ScaleGroup:
    """Channels produced by ``prev`` and read by ``linears``: one AWQ scale per channel."""

    prev: str  # RMSNorm weight (n,) or linear (n, n_in) whose output rows are divided by s
    linears: tuple[str, ...]  # linears (n_out, n) whose columns are multiplied by s
    gqa: bool = False  # prev is attn_v: a channel serves the query heads of its KV group


# Qwen3 (GGUF short names): which tensor's output feeds which linears, with only the linear map
# in between. q/k pass through QK-norm, so only v -> o is foldable inside attention.
QWEN3_GROUPS = (
    ScaleGroup("attn_norm", ("attn_q", "attn_k", "attn_v")),
    ScaleGroup("attn_v", ("attn_output",), gqa=True),
    ScaleGroup("ffn_norm", ("ffn_gate", "ffn_up")),
    ScaleGroup("ffn_up", ("ffn_down",)),
)


def channel_map(group: ScaleGroup, n_in: int, n_head: int, n_head_kv: int, head_dim: int) -> np.ndarray:
    """(n_in,) index of the scale of each input column of the group's linears."""
    if not group.gqa:
        return np.arange(n_in)
    col = np.arange(n_head * head_dim)  # attn_output column (h, d) = h * head_dim + d
    head, d = col // head_dim, col % head_dim
    return (head // (n_head // n_head_kv)) * head_dim + d  # v channel (h // group, d)


def fold(w: dict[str, torch.Tensor], group: ScaleGroup, scales: torch.Tensor, channel: np.ndarray) -> None:
    """Divide ``prev``'s output channels by ``scales`` and multiply the linears' columns by them."""
    prev = w[group.prev]
    w[group.prev] = prev / scales if prev.ndim == 1 else prev / scales[:, None]
    cols = scales[torch.from_numpy(channel)]  # (n_in,)
    for name in group.linears:
        w[name] = w[name] * cols[None, :]


def candidate_scales(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """AWQ's ``mean|x| ** alpha``, normalised so that max * min = 1 (alpha 0 gives all ones)."""
    s = np.maximum(mean_abs.astype(np.float64) ** alpha, 1e-4)
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


def quantized_weights(w: np.ndarray, type_name: str, importance: np.ndarray | None) -> np.ndarray:
    """What llama.cpp decodes after encoding ``w`` (rows, cols) in ``type_name``."""
    return ggml.dequantize(ggml.quantize(w, type_name, importance, n_threads=0), type_name, w.shape[1])


@dataclass(frozen=True)
class ScaleResult:
    scales: np.ndarray  # (n_channels,) float32: prev / scales, linear columns * scales[channel]
    alpha: float
    loss: float  # sum over the linears of ||X (W - Q)^T||^2 at alpha
    loss_plain: float  # the same at alpha = 0: importance-weighted RTN without scaling


def output_error(
    weights: list[tuple[np.ndarray, str]], h: torch.Tensor, mean_sq: np.ndarray, cols: np.ndarray
) -> float:
    """sum_i ||X (W_i - Q(W_i * cols) / cols)^T||^2 from H = X^T X, with the quantizer's importance
    the mean square of the scaled input X / cols."""
    importance = (mean_sq / cols**2).astype(np.float32)
    total = 0.0
    for w, type_name in weights:
        q = quantized_weights(w * cols[None, :], type_name, importance) / cols[None, :]
        e = torch.from_numpy(w - q)  # (rows, n_in)
        total += float(((e @ h) * e).sum())
    return total


def search_scales(
    weights: list[tuple[np.ndarray, str]],
    h: torch.Tensor,
    mean_abs: np.ndarray,
    mean_sq: np.ndarray,
    channel: np.ndarray,
    grid: int = 20,
) -> ScaleResult:
    """Best ``alpha`` in {0, 1/grid, ..., 1} for linears (rows, n_in) of a ggml type reading one
    input: ``h`` (n_in, n_in) sum of x x^T, ``mean_abs`` / ``mean_sq`` (n_in,) of x, ``channel``
    (n_in,) the scale index of each column. Ties keep the smaller alpha."""
    n_ch = int(channel.max()) + 1
    count = np.bincount(channel, minlength=n_ch)
    ch_abs = np.bincount(channel, weights=mean_abs, minlength=n_ch) / count  # (n_ch,)
    best: ScaleResult | None = None
    plain = 0.0
    for k in range(grid + 1):
        alpha = k / grid
        s = candidate_scales(ch_abs, alpha)
        loss = output_error(weights, h, mean_sq, s[channel])
        plain = loss if k == 0 else plain
        if best is None or loss < best.loss:
            best = ScaleResult(s, alpha, loss, plain)
    assert best is not None
    return ScaleResult(best.scales, best.alpha, best.loss, plain)
