"""Layer-by-layer calibration: each decoder layer is solved on the outputs of the already
quantized layers before it, with one layer's weights and the calibration activations in memory.

Within a layer the linears are solved in the order the data flows (true-sequential GPTQ):
q/k/v on the attention input, o on the attention output computed with the quantized q/k/v,
gate/up on the MLP input, down on the MLP activations computed with the quantized gate/up.
The layer's output with all its quantized weights is the next layer's input.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from ggq import qwen3
from ggq.checkpoint import Checkpoint, HParams
from ggq.gguf import recipe
from ggq.solvers.gptq import GPTQResult, SolverError, Target, gptq, supported_types


@dataclass(frozen=True)
class SolverOptions:
    damp: float = 0.01
    batch: int = 8  # calibration windows per forward batch (bounds activation memory)


@dataclass
class LayerReport:
    layer: int
    seconds: float = 0.0
    # linear -> (relative output error of RTN with the same block type, of the solver)
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)


def hessian(x: torch.Tensor) -> np.ndarray:
    """sum over tokens of x x^T, in float64: (n_in, n_in)."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
    return (flat.T @ flat).numpy()


def _rel_error(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    """||X (W - Q)^T|| / ||X W^T|| from the Hessian: tr(E H E^T) / tr(W H W^T), square-rooted."""
    e = (w - q).astype(np.float64)
    num = float(np.sum((e @ h) * e))
    den = float(np.sum((w.astype(np.float64) @ h) * w))
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def _rtn_weights(w: np.ndarray, type_name: str) -> np.ndarray:
    from ggq import ggml

    return ggml.dequantize(ggml.quantize(w, type_name), type_name, w.shape[1])


def check_targets(types: dict[str, str]) -> None:
    """Every layer linear must be a type the solver can target (before any work starts)."""
    ok = set(supported_types())
    for name, t in types.items():
        if name.startswith("blk.") and t not in recipe.FLOAT_TYPES and t not in ok:
            raise SolverError(f"{name}: GPTQ cannot target {t}; supported: {', '.join(sorted(ok))}")


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([fn(h[i : i + batch]) for i in range(0, h.shape[0], batch)])


def _solve_linears(
    names: tuple[str, ...],
    x: torch.Tensor,
    w: dict[str, torch.Tensor],
    types: dict[str, str],
    opts: SolverOptions,
    rep: LayerReport,
    results: dict[str, GPTQResult],
) -> None:
    """GPTQ for linears sharing the input ``x``; their weights in ``w`` become the solved ones."""
    hess = hessian(x)
    for name in names:
        t = types[f"blk.{rep.layer}.{name}.weight"]
        if t in recipe.FLOAT_TYPES:
            continue
        wn = w[name].numpy()
        res = gptq(wn, hess, Target(t), damp=opts.damp)
        rep.errors[name] = (_rel_error(wn, _rtn_weights(wn, t), hess), _rel_error(wn, res.weights, hess))
        results[name] = res
        w[name] = torch.from_numpy(res.weights)


def solve_layer(
    h: torch.Tensor,
    w: dict[str, torch.Tensor],
    hp: HParams,
    rope: qwen3.Rope,
    types: dict[str, str],
    opts: SolverOptions,
    rep: LayerReport,
) -> tuple[torch.Tensor, dict[str, GPTQResult]]:
    """One layer, true-sequential: returns the quantized layer's output and the solved linears."""
    results: dict[str, GPTQResult] = {}
    x_attn = _batched(lambda b: qwen3.attention_input(b, w, hp), h, opts.batch)
    _solve_linears(("attn_q", "attn_k", "attn_v"), x_attn, w, types, opts, rep, results)
    o_in = _batched(
        lambda b: qwen3.attention_core(qwen3.attention_input(b, w, hp), w, hp, rope), h, opts.batch
    )
    _solve_linears(("attn_output",), o_in, w, types, opts, rep, results)
    h_mid = h + o_in @ w["attn_output"].T
    x_mlp = qwen3.mlp_input(h_mid, w, hp)
    _solve_linears(("ffn_gate", "ffn_up"), x_mlp, w, types, opts, rep, results)
    d_in = qwen3.mlp_core(x_mlp, w)
    _solve_linears(("ffn_down",), d_in, w, types, opts, rep, results)
    out = h_mid + d_in @ w["ffn_down"].T  # the quantized layer's output feeds the next layer
    if not torch.isfinite(out).all():
        raise SolverError(f"layer {rep.layer}: NaN/Inf in the calibration activations")
    return out, results


def solve_layers(
    ckpt: Checkpoint,
    tokens: np.ndarray,
    types: dict[str, str],
    opts: SolverOptions,
    report: Callable[[LayerReport], None] | None = None,
) -> Iterator[tuple[int, dict[str, GPTQResult]]]:
    """Yield (layer, {linear short name: result}) layer after layer; ``tokens`` (nsamples, seqlen)."""
    hp = ckpt.hparams
    rope = qwen3.Rope.build(hp, tokens.shape[1])
    with torch.no_grad():
        h = qwen3.embed(ckpt, torch.from_numpy(tokens))  # (nsamples, seqlen, n_embd)
        for i in range(hp.n_layer):
            start = time.perf_counter()
            rep = LayerReport(i)
            h, results = solve_layer(h, qwen3.load_layer(ckpt, i), hp, rope, types, opts, rep)
            rep.seconds = time.perf_counter() - start
            if report:
                report(rep)
            yield i, results
