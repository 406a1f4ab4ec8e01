"""Per tensor and candidate type, the end-to-end loss (KL divergence of the next-token
distribution against the float model) that quantizing that one tensor to that type causes,
predicted from one calibration pass and calibrated on a sample of measured single-tensor changes.

1. One float forward over the calibration windows, layer by layer (qwen3's functions), gathers
   every linear's input Gram matrix H = X^T X (q/k/v share theirs, gate/up theirs), the final
   normed hidden state's (the input of ``output``) and the token counts (the rows of
   ``token_embd`` that are read).
2. Raw loss of (tensor, type): tr(E H E^T) / tokens, E = W - deq(Q_type(W)) by ggml's own encoder
   with the importance the writer will use (none for plain RTN, diag(H) / tokens for the
   calibrated methods and --imatrix); for the GPTQ methods (``error="gptq"``) Q_type is GPTQ
   itself on the float model's H, for the layers' linears: GPTQ lowers the error of the coarse
   types far more than that of the fine ones, so RTN's errors would price Q2_K/Q3_K too high. For ``token_embd``: the count-weighted squared error of its
   rows, plus the output part when the embedding is tied.
3. Probes: for a sample of tensors (all of them up to ``max_probes``), the mean KLD over the probe
   windows of the float model with that one tensor quantized at a probe type (about 3.4 bpw, by
   the same quantizer as its raw loss), computed from the cached hidden state at its layer. gain = measured KLD / raw loss; a tensor not
   probed takes the gain interpolated (in log) over the layers of the probed tensors of its role.
   Predicted KLD (tensor, type) = gain * raw loss: a plan's predicted KLD is the sum over tensors.

The result is cached as JSON keyed by the model files, the method, the importance source and the
calibration (text hash, windows, seed) and the probe settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ggq import ggml
from ggq.checkpoint import Checkpoint
from ggq.errors import GGQError
from ggq.files import atomic_write
from ggq.solvers.head import head_hessian

VERSION = 3  # 2: the GPTQ methods' errors are GPTQ's (error="gptq"); 3: the head solved too
PROBE_BPW = 3.4  # probe type: the candidate nearest this many bits per weight


class SensitivityError(GGQError, ValueError):
    """A model or setting the sensitivity pass cannot measure."""


@dataclass(frozen=True)
class SensitivitySettings:
    importance: str = "none"  # "none" (plain RTN), "calibration" (diag(H) / tokens)
    probe_windows: int = 4  # calibration windows the probes' KLD is measured on
    max_probes: int = 64  # single-tensor changes measured (all tensors when there are fewer)
    batch: int = 8  # windows per forward batch
    error: str = "rtn"  # "rtn": E by ggml's encoder; "gptq": by GPTQ on H (the layers' linears)
    damp: float = 0.01  # GPTQ's damping (error="gptq")
    act_order: bool = False  # GPTQ's column order (error="gptq")


@dataclass
class Sensitivity:
    key: str
    raw: dict[str, dict[str, float]]  # tensor -> type -> tr(E H E^T) / tokens
    gain: dict[str, float]  # tensor -> measured (or interpolated) KLD per unit of raw loss
    probes: dict[str, tuple[str, float]]  # tensor -> (probe type, measured mean KLD)
    seconds: dict[str, float] = field(default_factory=dict)

    def predicted(self) -> dict[str, dict[str, float]]:
        return {n: {t: self.gain[n] * r for t, r in types.items()} for n, types in self.raw.items()}


def cache_key(ckpt: Checkpoint, method: str, calibration: dict[str, object], s: SensitivitySettings) -> str:
    files = sorted(ckpt.path.glob("*.safetensors"))
    model = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    config = hashlib.sha256((ckpt.path / "config.json").read_bytes()).hexdigest()
    blob = json.dumps([VERSION, config, model, method, calibration, asdict(s)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_cached(path: Path) -> Sensitivity | None:
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    probes = {k: (v[0], float(v[1])) for k, v in d["probes"].items()}
    return Sensitivity(d["key"], d["raw"], d["gain"], probes, d.get("seconds", {}))


def save(path: Path, s: Sensitivity) -> None:
    with atomic_write(path, f".{os.getpid()}.tmp") as tmp:  # processes may share the cache
        tmp.write_text(json.dumps(asdict(s), indent=1, sort_keys=True) + "\n")


def role(name: str) -> str:
    return re.sub(r"^blk\.\d+\.", "", name)


def layer_index(name: str) -> int:
    m = re.match(r"^blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def probe_type(types: list[str]) -> str:
    quant = [t for t in types if not ggml.is_float(t)] or types
    return min(quant, key=lambda t: abs(_bpw(t) - PROBE_BPW))


def _bpw(t: str) -> float:
    g = ggml.ggml_type(t)
    return 8.0 * g.type_size / g.block_size


def quantized(w: np.ndarray, type_name: str, importance: np.ndarray | None) -> np.ndarray:
    """``w`` (rows, n) float32 through ggml's encoder of ``type_name`` and back; merged experts
    (E, rows, n) expert by expert, each with its own ``importance`` row (E, n)."""
    if w.ndim == 3:
        return np.stack(
            [quantized(w[e], type_name, None if importance is None else importance[e]) for e in range(len(w))]
        )
    data = ggml.quantize(np.ascontiguousarray(w, dtype=np.float32), type_name, importance)
    return ggml.dequantize(data, type_name, w.shape[-1]).reshape(w.shape).astype(np.float32)


def interpolate_gains(names: list[str], measured: dict[str, float]) -> dict[str, float]:
    """Gains of every tensor: measured ones as they are, the rest interpolated in log over the
    layer index among the measured tensors of the same role (the median of all where none)."""
    if not measured:
        raise SensitivityError("no single-tensor change was measured")
    fallback = float(np.median(list(measured.values())))
    out: dict[str, float] = {}
    for n in names:
        if n in measured:
            out[n] = measured[n]
            continue
        same = sorted((layer_index(m), g) for m, g in measured.items() if role(m) == role(n))
        if not same:
            out[n] = fallback
            continue
        xs, ys = zip(*same, strict=True)
        out[n] = float(np.exp(np.interp(layer_index(n), xs, np.log(np.maximum(ys, 1e-30)))))
    return out


def probe_sample(names: list[str], max_probes: int) -> list[str]:
    """All tensors, or ``max_probes`` of them spread evenly over each role's layers."""
    if len(names) <= max_probes:
        return list(names)
    by_role: dict[str, list[str]] = {}
    for n in names:
        by_role.setdefault(role(n), []).append(n)
    per = max(1, max_probes // len(by_role))
    out: list[str] = []
    for group in by_role.values():
        idx = np.unique(np.linspace(0, len(group) - 1, min(per, len(group))).round().astype(int))
        out += [group[i] for i in idx]
    return out


def measure(
    ckpt: Checkpoint,
    tokens: np.ndarray,
    types: dict[str, tuple[str, ...]],
    settings: SensitivitySettings,
    key: str,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> Sensitivity:
    """The sensitivity of every tensor in ``types`` (name -> candidate types) on calibration
    ``tokens`` (nsamples, seqlen)."""
    from ggq.plan import _float_model  # torch: imported only when a budget is planned

    t0 = time.perf_counter()
    model = _float_model.FloatModel(ckpt, device, settings.batch)
    stats = model.calibrate(tokens)
    t1 = time.perf_counter()
    sample = probe_sample(list(types), settings.max_probes)
    probe_types = {n: probe_type(list(types[n])) for n in sample}
    deq: dict[str, np.ndarray] = {}  # probed tensor -> its weights quantized at its probe type
    raw = {
        n: _raw_losses(ckpt, n, cands, stats, settings, model.tied, (probe_types.get(n), deq))
        for n, cands in types.items()
    }
    t2 = time.perf_counter()
    model.prepare_probes(tokens[: settings.probe_windows])
    measured: dict[str, float] = {}
    probes: dict[str, tuple[str, float]] = {}
    for n in sample:
        pt = probe_types[n]
        kld = model.probe_kld(n, deq.pop(n))
        probes[n] = (pt, kld)
        measured[n] = kld / raw[n][pt] if raw[n][pt] > 0 else 0.0
        if log:
            log(f"probe {n} {pt}: KLD {kld:.6f}, raw {raw[n][pt]:.4g}")
    t3 = time.perf_counter()
    seconds = {
        "calibration_pass": t1 - t0,
        "per_layer": (t1 - t0) / max(1, ckpt.hparams.n_layer),
        "raw_losses": t2 - t1,
        "probes": t3 - t2,
        "n_probes": float(len(probes)),
    }
    return Sensitivity(key, raw, interpolate_gains(list(types), measured), probes, seconds)


def _importance(name: str, stats: Any, settings: SensitivitySettings, n_in: int) -> np.ndarray | None:
    if settings.importance == "none":
        return None
    h = stats.h_of(name)
    if h is None:
        return None
    if name == "token_embd.weight":  # tied (h_of has none otherwise): solvers/head.py's ridge
        h = head_hessian(h, True)
    return (np.diagonal(h, axis1=-2, axis2=-1) / stats.tokens).astype(np.float32)  # (n,) or (E, n)


def _raw_losses(
    ckpt: Checkpoint,
    name: str,
    cands: tuple[str, ...],
    stats: Any,
    settings: SensitivitySettings,
    tied: bool,
    keep: tuple[str | None, dict[str, np.ndarray]],
) -> dict[str, float]:
    """tr(E H E^T) / tokens per candidate type; the quantized weights of type ``keep[0]`` (the
    probe type of a probed tensor, else None) are stored in ``keep[1]`` for the probe."""
    w = ckpt.load(name)  # (rows, n_in) float32
    imp = _importance(name, stats, settings, w.shape[-1])
    head = name == "output.weight" or (tied and name == "token_embd.weight")
    h = stats.h_of(name) if settings.error == "gptq" and (head or name.startswith("blk.")) else None
    if h is not None and head:  # as solvers/head.py solves it
        h = head_hessian(h, tied)
    out = {}
    factor = None  # a dense linear's factorization of h, made once for every candidate type
    for t in cands:
        # GPTQ's grid types (all the planner offers a GPTQ method's linears); the rest as RTN
        if h is not None and t in _gptq_types():
            q, factor = _gptq_weights(w, h, t, settings, factor)
        else:
            q = quantized(w, t, imp)
        out[t] = stats.loss(name, w - q, tied)
        if t == keep[0]:
            keep[1][name] = q
    return out


def _gptq_types() -> frozenset[str]:
    from ggq.solvers.options import supported_types

    return frozenset(supported_types())


def _gptq_weights(
    w: np.ndarray, h: np.ndarray, type_name: str, settings: SensitivitySettings, factor: Any = None
) -> tuple[np.ndarray, Any]:
    """What llama.cpp decodes from GPTQ's encoding of ``w`` in ``type_name`` on the float
    model's ``h``: the error the GPTQ methods leave (before the error of earlier layers), and the
    factorization of ``h`` (gptq.Factor) for the next type: ``factor``, an earlier call's, is
    reused (the same weights as factorizing again). Merged experts keep none: one n x n float32
    each, 8 GiB for 128 experts of width 4096."""
    from ggq.solvers.gptq import Target, gptq  # torch: only on the GPTQ methods' path

    if w.ndim == 3:  # merged experts, (E, rows, n) with (E, n, n): each on its own routed rows
        return np.stack([_gptq_weights(w[e], h[e], type_name, settings)[0] for e in range(len(w))]), None
    res = gptq(
        w,
        h if factor is None else None,
        Target(type_name),
        damp=settings.damp,
        act_order=settings.act_order,
        factor=factor,
    )
    return res.weights, res.factor
