"""AWQ scales of a Qwen3-MoE layer's experts, folded exactly into the model.

``ffn_norm`` feeds the router and every expert's gate/up: one scale per channel, shared by all
experts of the layer. Folding divides the norm's weight by it and multiplies the columns of every
expert's gate/up *and of the router* by it, so the router's logits (float32, kept as they are in
the file) and the experts' inputs are those of the original model up to float rounding. The
candidates are awq.search_scales' grid (``mean|x| ** alpha``, with and without the experts' mean
weight magnitude); the objective is the sum over experts of their gate/up output errors on the
tokens routed to each (each expert's strided sample weighted back to its routed token count).

``up -> down`` scales are per expert: awq.search_scales on the SwiGLU of its routed tokens, folded
into its own up rows and down columns. An expert with too few routed tokens for its own statistics
(the gptq fallback's threshold) gets no up -> down scaling: its SwiGLU statistics would be the
pooled ones of tokens it never sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ggq.solvers import awq

NORM = "ffn_norm"
ROUTER = "ffn_gate_inp"
GATE, UP, DOWN = "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"


@dataclass(frozen=True)
class Candidate:
    scales: np.ndarray  # (n_embd,) float32
    exponents: tuple[float, float]  # of mean|x| and of 1 / mean|w|; (0, 0) = no scaling


def norm_candidates(mean_abs: np.ndarray, experts: list[np.ndarray], grid: int = 20) -> list[Candidate]:
    """awq.ranked_scales' candidates for the shared ffn_norm scale, unscaled first: ``mean_abs``
    (n_embd,) of the layer's MLP input over all tokens, ``experts`` every expert's gate and up
    weights (rows, n_embd), whose row-relative magnitude gives the duo candidates' mean |w|."""
    w_mean = awq.row_relative_mean(experts)
    return [Candidate(s, e) for s, e in awq.grid_candidates(mean_abs, w_mean, grid)]


def candidate_losses(
    candidates: list[Candidate],
    weights: list[tuple[np.ndarray, str]],
    h: torch.Tensor,
    mean_sq: np.ndarray,
    factor: float,
) -> np.ndarray:
    """(len(candidates),) float64: ``factor`` x awq.output_error of one expert's gate/up under each
    candidate, from its input's sample ``h`` and ``mean_sq``."""
    return np.array([factor * awq.output_error(weights, h, mean_sq, c.scales) for c in candidates])


def fold_norm(w: dict[str, torch.Tensor], scales: torch.Tensor) -> None:
    """ffn_norm / s; every expert's gate/up columns and the router's columns * s."""
    w[NORM] = w[NORM] / scales
    w[ROUTER] = w[ROUTER] * scales[None, :]
    for n in (GATE, UP):
        w[n] = w[n] * scales[None, None, :]


def fold_up(w: dict[str, torch.Tensor], e: int, scales: torch.Tensor) -> None:
    """Expert ``e``: up rows / s, down columns * s (the SwiGLU is linear in up's output)."""
    w[UP][e] = w[UP][e] / scales[:, None]
    w[DOWN][e] = w[DOWN][e] * scales[None, :]
