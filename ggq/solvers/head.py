"""The output head (``output.weight``, or ``token_embd.weight`` when the embedding is tied) solved
on the calibration like a layer's linear, after the last layer.

Its input is the quantized model's final hidden state through ``output_norm``; H = X^T X of it.
``gptq`` and ``awq+gptq`` solve the head by GPTQ on H, ``awq`` encodes it by importance-weighted
RTN (diag(H) / tokens, llama.cpp's imatrix encoders; there is no norm to fold a scale into when
the embedding is tied, and the head is not searched). llama.cpp's own imatrix quants leave the
head unweighted: llama-imatrix collects ``output.weight`` only with ``--process-output`` and a
tied ``token_embd.weight`` never.

A tied matrix is also the embedding: each row read as a token's input vector, where its error
counts as ||e_r||^2 for every occurrence of the token. Most rows are read rarely or never in a
calibration sample (64 % of qwen3-micro's 16,384 rows in 128 x 512 tokens), so the row weights
are not taken from the sample's counts; instead every row gets the ridge
``TIED_RIDGE * mean(diag H) * I`` added to H, which keeps GPTQ from trading the rows' plain error
for H's too far. Measured on qwen3-micro (float model with only the head quantized, 16 held-out
windows, mean KLD and 99.9 % KLD): Q5_K plain RTN 0.00201 / 0.0370, diag(H)-weighted RTN 0.00177,
GPTQ on H alone 0.00164; ridge 0.1 / 0.3 / 1 / 3: 0.00146 / 0.00145 / 0.00152 / 0.00159 with
99.9 % 0.0411 / 0.0416 / 0.0338 / 0.0319; Q6_K RTN 0.000454 / 0.0070, ridge 0.1 0.000341 / 0.0065,
ridge 1 0.000343 / 0.0072. Per-row ridges from the sample's counts were worse at every scale
tried (0.00173-0.00197 at Q5_K): rows never seen got no ridge. Whole files (gptq Q4_K_M, all 232
held-out chunks, llama.cpp's KLD against F32): head by RTN 0.002122 (99.9 % 0.0222, top-1
96.21 %), ridge 0.1 0.002006 (0.0238, 96.36 %), ridge 1 0.001994 (0.0230, 96.45 %): ridge 1 is
kept, the smaller ridges cost more of the tail.
"""

from __future__ import annotations

import numpy as np

from ggq import ggml
from ggq.checkpoint import Checkpoint

TIED_RIDGE = 1.0  # times mean(diag H), added to a tied head's H (the embedding's share)


def head_hessian(h: np.ndarray, tied: bool) -> np.ndarray:
    """H of the head's input (float64, summed over tokens), with the tied embedding's ridge."""
    if not tied:
        return h
    out = h.copy()
    out[np.diag_indices_from(out)] += TIED_RIDGE * float(np.mean(np.diagonal(h)))
    return out


def solve_head(
    ckpt: Checkpoint,
    name: str,
    type_name: str,
    h: np.ndarray,
    tokens: int,
    use_gptq: bool,
    damp: float,
    act_order: bool,
) -> np.ndarray:
    """The bytes of head ``name`` in ``type_name``: GPTQ on ``h`` (X^T X over ``tokens`` rows of
    the head's input, float64), or importance-weighted RTN (diag(h) / tokens) without
    ``use_gptq`` or for a type without a code grid (IQ4_XS)."""
    from ggq.solvers.gptq import Factor, Target, gptq  # torch: this module is imported without it
    from ggq.solvers.options import HEAD_ROWS, supported_types
    from ggq.solvers.reductions import fixed_order

    hh = head_hessian(h, name == "token_embd.weight")
    rows = ckpt.entries[name].shape[0]
    imp = (np.diagonal(hh) / max(1, tokens)).astype(np.float32)
    parts: list[np.ndarray] = []
    factor: Factor | None = None
    with fixed_order():
        for r0 in range(0, rows, HEAD_ROWS):
            w = ckpt.load(name, r0, min(rows, r0 + HEAD_ROWS))  # (rows, n_embd) float32
            if not use_gptq or type_name not in supported_types():
                parts.append(ggml.quantize(w, type_name, imp))
                continue
            res = gptq(
                w,
                hh if factor is None else None,
                Target(type_name),
                damp=damp,
                act_order=act_order,
                factor=factor,
            )
            factor = res.factor
            parts.append(res.data)
    return np.concatenate(parts)
