"""Mixed types under a size budget: which ggml type each quantizable tensor gets so that the whole
file (header, key/values, tokenizer, tensor data, alignment) fits a byte budget with the least
predicted loss.

Sizes are 1024-based, as llama.cpp prints them (MiB, GiB): ``4.2G`` = ``4.2GiB`` = 4.2 * 2^30
bytes; a plain number is bytes. ``KB``/``MB``/``GB`` are refused rather than guessed at.
``--target-bpw B`` is B bits per weight over every tensor element of the file: B * n / 8 bytes
for the whole file (llama.cpp's BPW counts the tensor data only, so a file at B bpw here has a
little less tensor data than one llama.cpp prints as B bpw).

The allocation is a knapsack over (tensor, type) -> (bytes, predicted loss): exact dynamic
programming over the bytes in small units (each tensor's bytes rounded up, so the plan is never
over), then the least loss among the fills within ``FILL`` of the budget.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ggq import ggml
from ggq.checkpoint import Checkpoint
from ggq.convert import ConvertOptions, file_kv, file_size, make_plan, prepare_calibration, tensor_specs
from ggq.errors import GGQError
from ggq.eval.baseline import cache_dir
from ggq.plan.recipe import allows_quantization
from ggq.plan.sensitivity import Sensitivity, SensitivitySettings, cache_key, load_cached, measure, save
from ggq.solvers.method import method
from ggq.solvers.options import supported_types

# the types the planner chooses from, smallest first; Q4_0/Q5_0 stand in where a row is not a
# whole number of 256-blocks, F16 tops every range (the largest file a budget may ask for)
CANDIDATES = ("Q2_K", "Q3_K", "IQ4_XS", "IQ4_NL", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16")
SMALL_ROW = ("Q4_0", "Q5_0")
FILL = 0.005  # a plan is at most this fraction under the budget (when one exists)
UNITS = 200_000  # knapsack resolution: the budget in at most this many units

_UNITS = {"": 1, "K": 2**10, "KIB": 2**10, "M": 2**20, "MIB": 2**20, "G": 2**30, "GIB": 2**30}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")
ACCEPTED = "bytes (7780000), or K/M/G, KiB/MiB/GiB (1024-based: 7.42M = 7.42MiB, 4.2G)"


class BudgetError(GGQError, ValueError):
    """A size budget that cannot be parsed or reached; the message gives the accepted forms or
    the reachable range."""


def parse_size(text: str, option: str = "--target-size") -> int:
    """``"7.42MiB"`` -> 7780433 bytes (rounded down: a budget is a ceiling)."""
    m = _SIZE.match(text)
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS:
        raise BudgetError(f"{option} {text!r}: not a size; accepted: {ACCEPTED}")
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n: int) -> str:
    return f"{n:,} bytes ({n / 2**20:.2f} MiB)"


@dataclass(frozen=True)
class Choice:
    """One tensor's options: its candidate types with their bytes and predicted losses."""

    name: str
    types: tuple[str, ...]
    nbytes: tuple[int, ...]
    loss: tuple[float, ...]


def candidates(shape: Sequence[int], allowed: frozenset[str] | None = None) -> tuple[str, ...]:
    """The candidate types a tensor of ggml ``shape`` can take (its row length ``shape[0]`` a whole
    number of the type's blocks), within ``allowed`` (a solver's targets) where given."""
    ncols = int(shape[0])
    out = [t for t in CANDIDATES if ncols % ggml.get(t).block_size == 0]
    if ncols % 256:
        out[:0] = [t for t in SMALL_ROW if ncols % ggml.get(t).block_size == 0]
    if allowed is not None:
        out = [t for t in out if t in allowed or ggml.is_float(t)]
    return tuple(out) or ("F16",)


def padded(nbytes: int, alignment: int = 32) -> int:
    return -(-nbytes // alignment) * alignment


def reachable(fixed: int, choices: Sequence[Choice]) -> tuple[int, int]:
    """The smallest and largest file the candidates allow (``fixed``: header and fixed tensors)."""
    lo = fixed + sum(min(padded(b) for b in c.nbytes) for c in choices)
    hi = fixed + sum(max(padded(b) for b in c.nbytes) for c in choices)
    return lo, hi


def check_reachable(budget: int, fixed: int, choices: Sequence[Choice], what: str) -> None:
    lo, hi = reachable(fixed, choices)
    if not lo <= budget <= hi:
        raise BudgetError(
            f"{what}: {format_size(budget)} is outside the reachable range "
            f"{format_size(lo)} .. {format_size(hi)} (every tensor at its smallest candidate .. F16)"
        )


@dataclass(frozen=True)
class Allocation:
    types: dict[str, str]
    file_bytes: int
    predicted_loss: float


def allocate(budget: int, fixed: int, choices: Sequence[Choice]) -> Allocation:
    """The least total predicted loss whose file (``fixed`` + padded tensor bytes) is at most
    ``budget``, preferring fills within ``FILL`` under it: an exact knapsack over byte units."""
    free = budget - fixed
    unit = max(1, math.ceil(free / UNITS))
    cap = free // unit
    best = np.full(cap + 1, np.inf)  # best[c]: least loss of the tensors so far at exactly c units
    best[0] = 0.0
    picks = []
    for c in choices:
        w = [-(-padded(b) // unit) for b in c.nbytes]
        new = np.full(cap + 1, np.inf)
        pick = np.zeros(cap + 1, dtype=np.int8)
        for k, (wk, lk) in enumerate(zip(w, c.loss, strict=True)):
            if wk > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[wk:] = best[: cap + 1 - wk] + lk
            better = cand < new
            new[better], pick[better] = cand[better], k
        best = new
        picks.append(pick)
    if not np.isfinite(best).any():
        raise BudgetError(f"no plan fits {format_size(budget)}")
    full = np.arange(cap + 1) * unit >= (1 - FILL) * budget - fixed
    pool = np.where(full & np.isfinite(best), best, np.inf)
    c_end = int(np.argmin(pool if np.isfinite(pool).any() else best))
    types: dict[str, str] = {}
    total, c_left = fixed, c_end
    for c, pick in zip(reversed(choices), reversed(picks), strict=True):
        k = int(pick[c_left])
        types[c.name] = c.types[k]
        total += padded(c.nbytes[k])
        c_left -= -(-padded(c.nbytes[k]) // unit)
    loss = sum(c.loss[c.types.index(types[c.name])] for c in choices)
    return Allocation({c.name: types[c.name] for c in choices}, total, loss)


@dataclass(frozen=True)
class BudgetRequest:
    """``--target-size`` (text as given) or ``--target-bpw``; where the sensitivity cache lives."""

    size: str | None = None
    bpw: float | None = None
    cache: Path | None = None  # folder of the cached measurements (default: ggq's cache / sensitivity)
    settings: SensitivitySettings = field(default_factory=SensitivitySettings)

    @property
    def option(self) -> str:
        return "--target-size" if self.size is not None else "--target-bpw"

    def budget(self, n_weights: int) -> int:
        if self.size is not None:
            return parse_size(self.size)
        if self.bpw is None or not math.isfinite(self.bpw) or self.bpw <= 0:
            raise BudgetError(f"--target-bpw {self.bpw}: expected a positive number of bits per weight")
        return int(self.bpw * n_weights / 8)


@dataclass(frozen=True)
class BudgetPlan:
    opts: ConvertOptions  # the options with the per-tensor types and the ggq.plan.* keys
    budget: int
    allocation: Allocation
    sensitivity: Sensitivity
    cached: bool


def _allowed(name: str, method_name: str) -> frozenset[str] | None:
    """A GPTQ method can target only the types with a code grid (the layers' linears)."""
    if name.startswith("blk.") and method(method_name).uses_gptq:
        return frozenset(supported_types())
    return None


def plan_budget(
    ckpt: Checkpoint, opts: ConvertOptions, req: BudgetRequest, log: Callable[[str], None] | None = None
) -> BudgetPlan:
    """Per-tensor types for ``req``'s budget: the sensitivity (measured, or read from the cache),
    then the knapsack over the whole file's bytes as the writer will write them."""
    base = make_plan(ckpt, opts)
    specs = {s.name: s for s in tensor_specs(ckpt)}
    free = [t for t in base if allows_quantization(specs[t.name], opts.recipe)]
    cands = {t.name: candidates(t.shape, _allowed(t.name, opts.method)) for t in free}
    budget = req.budget(sum(int(np.prod(t.shape)) for t in base))
    nbytes = {t.name: tuple(ggml.nbytes(q, t.shape) for q in cands[t.name]) for t in free}
    target = req.size if req.size is not None else f"{req.bpw}bpw"
    prepared = prepare_calibration(ckpt, opts)
    settings = req.settings
    if opts.kind.needs_calibration or opts.imatrix:
        settings = replace(settings, importance="calibration")
    if opts.kind.uses_gptq:
        settings = replace(settings, error="gptq", damp=opts.cal.damp, act_order=opts.cal.act_order)
    key = cache_key(ckpt, opts.method, prepared.provenance, settings)
    kv = (("budget", budget), ("target", target), ("predicted_kld", 0.0), ("sensitivity", key))
    calib = prepared.provenance if opts.kind.needs_calibration else {}
    fixed = file_size(file_kv(ckpt, replace(opts, plan_kv=kv), calib), base) - sum(
        padded(t.nbytes) for t in free
    )
    sized = [Choice(n, cands[n], nbytes[n], ()) for n in cands]
    check_reachable(budget, fixed, sized, f"{req.option} {target}")  # before any measurement
    path = (req.cache or cache_dir() / "sensitivity") / f"{key}.json"
    sens = load_cached(path)
    cached = sens is not None and all(set(cands[n]) <= set(sens.raw.get(n, ())) for n in cands)
    if sens is None or not cached:
        sens = measure(ckpt, prepared.windows.tokens, cands, settings, key, prepared.device, log)
        save(path, sens)
    losses = sens.predicted()
    choices = [Choice(n, cands[n], nbytes[n], tuple(losses[n][q] for q in cands[n])) for n in cands]
    alloc = allocate(budget, fixed, choices)
    kv = (*kv[:2], ("predicted_kld", float(alloc.predicted_loss)), kv[3])
    planned = replace(opts, tensor_overrides=tuple(alloc.types.items()), plan_kv=kv)
    size = file_size(file_kv(ckpt, planned, calib), make_plan(ckpt, planned))
    if size != alloc.file_bytes or size > budget:
        raise BudgetError(
            f"{req.option}: planned {size} bytes, expected {alloc.file_bytes} (budget {budget})"
        )
    return BudgetPlan(planned, budget, alloc, sens, cached)
