"""What a calibrated conversion is asked to do and what it reports, without torch: RTN conversion,
`--dry-run` plans and option checks import this module, so that they never load torch (about
200 MiB of a process that otherwise needs ~130 MiB)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ggq import ggml
from ggq.errors import GGQError
from ggq.solvers.method import CALIBRATED, Method, method

if TYPE_CHECKING:
    from ggq.checkpoint import HParams

DEVICES = ("auto", "cpu", "cuda")
# the parts of a layer's time in LayerReport.times
PARTS = ("load", "forward", "stats", "solve", "encode", "diag")


class SolverError(GGQError, ValueError):
    """A tensor or Hessian the solver cannot handle; names what is wrong."""


def supported_types() -> list[str]:
    """The types whose codes a solver can choose (a code grid in ggq.ggml), in registration order."""
    return [name for name, fmt in ggml.FORMATS.items() if fmt.grid is not None]


HEAD = -1  # solve_layers' index of the output head's result (solvers/head.py), after the last layer


def head_tensor(types: dict[str, str]) -> str | None:
    """The head tensor the solvers write after the last layer (``output.weight``, or the tied
    ``token_embd.weight`` when the file has no output), or None when it is kept in a float type."""
    name = "output.weight" if "output.weight" in types else "token_embd.weight"
    t = types.get(name)
    if t is None or t in ggml.FLOAT_TYPES:
        return None
    return name


@dataclass(frozen=True)
class SolverOptions:
    method: str = "gptq"  # one of method.CALIBRATED
    damp: float = 0.01
    act_order: bool = False  # GPTQ: columns by decreasing Hessian diagonal
    batch: int = 8  # calibration windows per forward batch: what is held of a linear's input
    awq_grid: int = 20  # alpha in {0, 1/grid, ..., 1}
    refine_scales: bool = (
        False  # AWQ: per-channel coordinate descent from the grid's best (awq.refine_scales)
    )
    refit_norms: bool = True  # AWQ: least-squares refit of the folded norms after quantization
    clip: bool = True  # awq: AWQ's clipping search before the importance-weighted encoder
    search_tokens: int = 16384  # tokens whose X^T X scores the AWQ candidates (evenly strided)
    # AWQ: each linear's candidates scored on about this many of its rows (every rows //
    # search_rows-th; all under 2 x search_rows rows); 0: every row
    search_rows: int = 512
    # AWQ: the best this many candidates of the linears' output error re-ranked by the error of
    # their block's output (attention after o_proj, MLP after down_proj, the rest float); <= 1: off
    block_candidates: int = 0
    block_tokens: int = 8192  # tokens (whole windows, evenly strided) of that block objective
    # AWQ: the best this many candidates re-ranked by their output error after the clip search
    # (scales and clipping searched jointly); <= 1: off
    clip_candidates: int = 0
    clip_candidate_grid: int = 20  # clip ratios of that joint search (1 down to 0.5 in this many steps)
    salience: str = "mean_abs"  # AWQ: a channel's salience, mean |x| (AWQ's) or "rms" sqrt(mean x^2)
    device: str = "cpu"  # torch device of the forward passes and statistics (see resolve_device)
    # tokens (evenly strided) on which LayerReport.errors are measured; 0: no error diagnostics
    diag_tokens: int = 512
    # about this many rows (every rows // diag_rows-th) of each linear in those diagnostics; 0: all
    diag_rows: int = 512
    # bytes of the residual stream of all windows (nsamples x seqlen x n_embd x 4) above which it
    # is kept in a temporary file instead of memory (Qwen3-8B at 128 x 512: 1 GiB)
    max_residual_bytes: int = 512 << 20
    # bytes the solver may use (``--max-memory``); 0: no budget (batch and max_residual_bytes as
    # given). With one, fit_memory lowers the batch and keeps the residual stream in a file where
    # they would not fit, and refuses a budget below what one layer needs
    max_memory: int = 0
    # Qwen3-MoE: an expert routed fewer calibration tokens than this (0: the layer's n_embd, the
    # fewest whose X^T X can have full rank) falls back to a Hessian over all of the layer's tokens
    expert_min_tokens: int = 0
    expert_weighting: str = "plain"  # "weighted": an expert's X^T X weights each token by its routing weight
    # False (the default): X^T X from float32 chunk products of the upper triangle added in
    # float64, and one blocked factorization H = M M^T (gptq.gptq). True: GPTQ as before issue
    # 13's part 3, X^T X from float64 products of the whole matrix and GPTQ's feedback from the
    # Cholesky factor of H^-1 (chol(H), its inverse, chol(H^-1)); tools/bench_solver.py --legacy
    # compares the two. (The thread-dependent bytes a fresh-clone CI found, which kept this True
    # for a while, came with either path: every layer now runs under fixed_order().)
    legacy_gptq: bool = False
    # the output head (output.weight, or the tied token_embd.weight) solved after the last layer
    # on its input's X^T X (solvers/head.py); False: RTN by the writer, as before
    solve_head: bool = True

    @property
    def kind(self) -> Method:
        return method(self.method)


# -- memory (``--max-memory``): what one layer of the solver holds, from the shapes alone -------

# python, torch, MKL, the tokenizer, ggq and the allocator's slack: measured 242 MiB after
# importing torch and the solvers; a `ggq convert` process peaks ~100 MiB above the solver alone.
# 448 MiB was 19 MiB short on the fresh-clone CI (a 2-window gptq run peaked at 810 MiB against an
# estimate of 791): 512 keeps the estimate an upper bound there too
PROCESS_BYTES = 512 << 20
GRAM_CHUNK_ROWS = 1024  # reductions.GRAM_ROWS (no torch here): rows per float64 chunk of X^T X
MEAN_CHUNK_ROWS = 4096  # layerwise.MEAN_ROWS: rows held (and joined, a copy) until a whole chunk is there
HEAD_ROWS = 8192  # rows of the output head solved at a time (one factorization for all)
DEFAULT_MEMORY_FRACTION = 0.75  # of the available memory: --max-memory's default


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes one layer of the solver holds, by what holds them: ``fixed`` whatever the batch
    (the process, the layer's float32 weights, the largest statistics and the solver's copies),
    ``per_window`` for each calibration window of a forward batch, ``residual`` for the residual
    stream of every window unless it is kept in a file."""

    fixed: int
    per_window: int
    residual: int

    def total(self, batch: int, spill: bool) -> int:
        return self.fixed + batch * self.per_window + (0 if spill else self.residual)


def memory_need(hp: HParams, nsamples: int, seqlen: int, method_name: str) -> MemoryNeed:
    """The solver's memory for one layer of ``hp`` at its peak (the statistics of the widest
    input, GPTQ or AWQ's search on the widest linear, or the attention forward), counted from the
    shapes (float32 = 4 bytes): the layer's weights once; GPTQ's float64 X^T X of the widest input
    (factorized in place) and the loop's copies of the widest linear (weights and error update:
    2 x 4 bytes, and 1 byte of codes per weight); AWQ's float32 sample X^T X, its search
    copies of the gate/up group (3 x 4 bytes per weight) and the linears kept for the norm refit.
    Per window: the MLP's input (with its norm's temporaries), gate, up, and the reductions'
    temporaries, or the attention's projections, repeated KV heads and output, whichever is
    larger. Checked against measured peaks in tests/test_max_memory.py."""
    kind = method(method_name)
    n, f, t = hp.n_embd, hp.n_ff, seqlen
    a, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    widest = max(n, f, a)
    weights = 4 * (2 * n * a + 2 * n * kv + 3 * n * f)
    stats = 8 * GRAM_CHUNK_ROWS * widest + 2 * 4 * MEAN_CHUNK_ROWS * widest
    solve = 0
    if kind.uses_gptq:
        stats += 8 * widest * widest
        solve = 9 * n * max(f, a)
    if kind.scales_activations:
        stats += 4 * widest * widest
        solve = max(solve, 12 * 2 * n * f) + 4 * 2 * n * f
    mlp = 4 * t * (3 * n + 4 * f)
    attn = 4 * t * (3 * n + 6 * a + 4 * kv)
    # the output head after the last layer (solvers/head.py): HEAD_ROWS rows at a time, as a
    # linear of that many rows (weights, the loop's copies), and every row's bytes (<= 1 per weight)
    head = 8 * n * n + (4 + 9) * HEAD_ROWS * n + hp.n_vocab * n
    return MemoryNeed(
        fixed=PROCESS_BYTES + max(weights + stats + solve, head),
        per_window=max(mlp, attn),
        residual=4 * nsamples * t * n,
    )


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def fit_memory(opts: SolverOptions, hp: HParams, nsamples: int, seqlen: int) -> SolverOptions:
    """``opts`` within ``opts.max_memory``: the batch lowered (the bytes do not depend on it) and
    the residual stream kept in a file (same bytes) where they would not fit; a budget below one
    window at a time with the residual in a file is an error saying how much is needed."""
    if not opts.max_memory:
        return opts
    need = memory_need(hp, nsamples, seqlen, opts.method)
    least = need.total(1, spill=True)
    if least > opts.max_memory:
        raise SolverError(
            f"--max-memory {_size(opts.max_memory)}: one layer of {opts.method} needs at least {_size(least)} "
            f"here (one {seqlen}-token window at a time, the activations in a file)"
        )
    batch = min(opts.batch, nsamples)
    spill = need.residual > opts.max_residual_bytes or need.total(batch, False) > opts.max_memory
    room = opts.max_memory - need.total(0, spill)
    batch = max(1, min(batch, room // need.per_window))
    return replace(opts, batch=batch, max_residual_bytes=0 if spill else need.residual)


def available_memory() -> int:
    """MemAvailable of /proc/meminfo (bytes), else the physical memory; 0 where neither is known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def default_max_memory() -> int:
    """``--max-memory``'s default: DEFAULT_MEMORY_FRACTION of the available memory (0: unknown, no budget)."""
    return int(DEFAULT_MEMORY_FRACTION * available_memory())


@dataclass
class LayerReport:
    layer: int
    seconds: float = 0.0
    # linear -> (relative output error of RTN with the same block type, of the solver)
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    # AWQ: scaled group (named by the tensor folded into) -> exponents of mean|x| and 1/mean|w|
    alphas: dict[str, tuple[float, float]] = field(default_factory=dict)
    # GPTQ: linear -> the damping it used (the requested one, or raised until H was positive definite)
    damp: dict[str, float] = field(default_factory=dict)
    # part (PARTS) -> seconds spent in it: reading the layer's weights, forward passes, input
    # statistics (X^T X, means), solver loops (GPTQ, AWQ's searches and refits, less their
    # encodes), ggml encode/decode (in and out of the loops), error diagnostics (.errors)
    times: dict[str, float] = field(default_factory=dict)
    # part of the solver -> the device it ran on (solver_devices)
    devices: dict[str, str] = field(default_factory=dict)
    # Qwen3-MoE: calibration tokens routed to each expert of the layer, and the experts that fell back
    expert_tokens: list[int] = field(default_factory=list)
    expert_fallbacks: list[int] = field(default_factory=list)


@dataclass
class _Clock:
    times: dict[str, float]
    stack: list[list[float]] = field(default_factory=list)  # [start, seconds of nested parts]
    parts: list[str] = field(default_factory=list)


_CLOCK: ContextVar[_Clock | None] = ContextVar("ggq_solver_clock", default=None)


@contextmanager
def clock(times: dict[str, float]) -> Iterator[None]:
    """Charge the ``timed`` parts run inside to ``times`` (part -> seconds)."""
    token = _CLOCK.set(_Clock(times))
    try:
        yield
    finally:
        _CLOCK.reset(token)


@contextmanager
def timed(part: str) -> Iterator[None]:
    """Time spent inside goes to ``part`` of the current ``clock`` (if any), less the time of
    parts nested in it; inside ``diag`` everything is diag (what turning diagnostics off saves)."""
    c = _CLOCK.get()
    if c is None or (c.parts and c.parts[-1] == "diag"):
        yield
        return
    c.stack.append([time.perf_counter(), 0.0])
    c.parts.append(part)
    try:
        yield
    finally:
        start, nested = c.stack.pop()
        c.parts.pop()
        spent = time.perf_counter() - start
        c.times[part] = c.times.get(part, 0.0) + spent - nested
        if c.stack:
            c.stack[-1][1] += spent


def solver_devices(device: str) -> dict[str, str]:
    """Where each part of the solver runs given the resolved torch ``device``: the forward passes,
    input statistics (X^T X, means), AWQ's candidate products and the error diagnostics on it;
    GPTQ's factorization and column loop and every ggml encode/decode on the CPU (numpy)."""
    return {
        "forward": device,
        "stats": device,
        "awq_search": device,
        "diag": device,
        "gptq": "cpu",
        "encode": "cpu",
    }


def devices_line(devices: dict[str, str]) -> str:
    """``devices`` (solver_devices) in one line: each device and the parts on it."""
    on: dict[str, list[str]] = {}
    for part, dev in devices.items():
        on.setdefault(dev, []).append(part)
    return "solver devices: " + "; ".join(f"{', '.join(parts)} on {dev}" for dev, parts in on.items())


def check_device(name: str) -> None:
    """A known ``--device`` name (checked without torch)."""
    if name not in DEVICES:
        raise SolverError(f"--device {name}: unknown; known: {', '.join(DEVICES)}")


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` where torch sees a CUDA device, else ``cpu``; ``cuda`` without one is
    an error naming the torch build."""
    check_device(name)
    import torch  # only here: choosing a device is the first thing that needs it

    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "built without CUDA"
        raise SolverError(f"--device cuda: torch sees no CUDA device (torch {torch.__version__}, {build})")
    return "cuda"


def check_targets(types: dict[str, str], name: str = "gptq") -> None:
    """Every layer linear must be a type the method can target (before any work starts)."""
    if name not in CALIBRATED:
        raise SolverError(f"unknown calibration method {name!r}; known: {', '.join(CALIBRATED)}")
    uses_gptq = method(name).uses_gptq
    ok = set(supported_types()) if uses_gptq else set(ggml.FORMATS)
    solver = "GPTQ" if uses_gptq else "AWQ"
    for name, t in types.items():
        if name.startswith("blk.") and t not in ggml.FLOAT_TYPES and t not in ok:
            raise SolverError(f"{name}: {solver} cannot target {t}; supported: {', '.join(sorted(ok))}")


# -- distillation (solvers/distill.py; here so that convert checks it without torch) ----------


class DistillError(GGQError, ValueError):
    """A distillation setting or state that cannot be used."""


@dataclass(frozen=True)
class DistillOptions:
    steps: int = 0  # optimiser steps; 0 = no distillation
    lr: float = 0.01  # the mean step of the code indices (in codes), decayed linearly to 0
    norm_lr: float = 0.003  # Adam's step size on the norm weights
    batch: int = 4  # calibration windows per step
    eval_every: int = 10  # steps between held-out KLD measurements
    patience: int = 6  # measurements without a new best before stopping
    holdout: int = 0  # calibration windows held out for early stopping; 0 = an eighth, at least 1
    seed: int = 0
    block_steps: int = 0  # steps per decoder layer of the block-wise phase; 0 = none
    block_lr: float = 0.005  # that phase's sign step on the code indices, decayed linearly to 0
    block_batch: int = 8  # calibration windows per step of that phase

    @property
    def on(self) -> bool:
        return bool(self.steps or self.block_steps)


def check_distill(o: DistillOptions, n_windows: int) -> None:
    if o.steps < 0:
        raise DistillError(f"--distill {o.steps}: the number of steps cannot be negative")
    if not (o.lr > 0 and math.isfinite(o.lr)) or o.lr > 1:
        raise DistillError(f"--distill-lr {o.lr}: expected a step size in (0, 1] grid steps")
    if not (o.norm_lr >= 0 and math.isfinite(o.norm_lr)):
        raise DistillError(f"--distill-norm-lr {o.norm_lr}: expected a finite value >= 0")
    if o.block_steps < 0:
        raise DistillError(f"--distill-blocks {o.block_steps}: the number of steps cannot be negative")
    if not (o.block_lr > 0 and math.isfinite(o.block_lr)) or o.block_lr > 1:
        raise DistillError(f"--distill-block-lr {o.block_lr}: expected a step size in (0, 1] codes")
    if o.batch < 1 or o.block_batch < 1 or o.eval_every < 1 or o.patience < 1:
        raise DistillError("distill batch, eval_every and patience must be >= 1")
    if o.on and n_windows < 2:
        raise DistillError(f"--distill: needs at least 2 calibration windows (--nsamples), got {n_windows}")


@dataclass(frozen=True)
class BlockReport:
    """One decoder layer's block-wise phase: its held-out relative output error before and after."""

    layer: int
    best_step: int
    first: float
    best: float
    seconds: float


@dataclass(frozen=True)
class StepReport:
    step: int
    loss: float  # mean KL of the step's training batch
    heldout_kld: float | None  # mean KL on the held-out windows, when measured at this step
    best_step: int
    seconds: float


DistillReport = StepReport | BlockReport  # what a distillation reports as it goes
