"""`ggq convert` on the terminal: the plan as a table or JSON (``--dry-run``), a progress bar and
one line per solved layer while the file is written, then the result (or its JSON).

The conversion itself is ``ggq.convert``; this module only shows it. The tensor plan is made
once here and handed to ``convert``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from ggq.checkpoint import Checkpoint, resolve
from ggq.convert import (
    ConvertError,
    ConvertOptions,
    PlannedTensor,
    bits_per_weight,
    convert,
    default_output_name,
    make_plan,
    solver_memory,
)
from ggq.imatrix import load_imatrix
from ggq.plan.budget import BudgetPlan, BudgetRequest, format_size, plan_budget
from ggq.solvers.options import (
    BlockReport,
    DistillReport,
    LayerReport,
    SolverOptions,
    StepReport,
    devices_line,
    fit_memory,
)


def _exponents(ax: float, aw: float) -> str:
    return f"x^{ax:.2f}" + (f"/w^{aw:.2f}" if aw else "")


def layer_line(method: str, rep: LayerReport, damp: float) -> str:
    errs = "  ".join(f"{k} {a:.4f}->{b:.4f}" for k, (a, b) in rep.errors.items())
    alphas = "  ".join(f"{k} {_exponents(ax, aw)}" for k, (ax, aw) in rep.alphas.items())
    raised = "  ".join(f"{k} {d:g}" for k, d in rep.damp.items() if d > damp)
    line = f"layer {rep.layer:3d}  {rep.seconds:6.1f}s  rel. output error rtn->{method}: {errs}"
    line += f"  awq scales: {alphas}" if alphas else ""
    line += f"  damping raised (H not positive definite at {damp:g}): {raised}" if raised else ""
    if rep.expert_tokens:  # Qwen3-MoE
        n = sorted(rep.expert_tokens)
        line += f"  tokens per expert min/median/max {n[0]}/{statistics.median(n):g}/{n[-1]}"
        line += f", {len(rep.expert_fallbacks)} fell back (pooled X^T X): {rep.expert_fallbacks}"
    return line


def block_line(rep: BlockReport, steps: int) -> str:
    return (
        f"distill layer {rep.layer:3d}  {steps} steps {rep.seconds:6.1f}s  held-out output error "
        f"{rep.first:.3e} -> {rep.best:.3e} ({100 * (rep.best / rep.first - 1):+.1f} %, best: step {rep.best_step})"
    )


def distill_line(rep: StepReport, steps: int) -> str:
    line = f"distill {rep.step:5d}/{steps}  {rep.seconds:5.2f}s"
    line += f"  train KLD {rep.loss:.5f}" if rep.step else ""
    if rep.heldout_kld is not None:
        line += f"  held-out KLD {rep.heldout_kld:.5f} (best: step {rep.best_step})"
    return line


def layer_json(rep: LayerReport) -> dict[str, object]:
    return {
        "layer": rep.layer,
        "seconds": round(rep.seconds, 3),
        "rel_error": {k: {"rtn": a, "solver": b} for k, (a, b) in rep.errors.items()},
        "awq_exponents": {k: {"x": ax, "w": aw} for k, (ax, aw) in rep.alphas.items()},
        "devices": rep.devices,
        **({"gptq_damp": rep.damp} if rep.damp else {}),
        **(
            {"expert_tokens": rep.expert_tokens, "expert_fallbacks": rep.expert_fallbacks}
            if rep.expert_tokens
            else {}
        ),
    }


def plan_json(plan: list[PlannedTensor]) -> list[dict[str, object]]:
    return [{"name": t.name, "shape": list(t.shape), "type": t.type, "bytes": t.nbytes} for t in plan]


def _print_plan(plan: list[PlannedTensor]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("tensor", "shape", "type", "bytes", "bpw")
    for t in plan:
        table.add_row(
            t.name, " x ".join(map(str, t.shape)), t.type, f"{t.nbytes:,}", f"{bits_per_weight([t]):.2f}"
        )
    table.add_section()
    total = sum(t.nbytes for t in plan)
    table.add_row(
        f"total ({len(plan)} tensors)",
        "",
        "",
        f"{total:,} ({total / 2**20:.1f} MiB)",
        f"{bits_per_weight(plan):.2f}",
    )
    Console().print(table)


def _write(
    ckpt: Checkpoint, out: Path, opts: ConvertOptions, plan: list[PlannedTensor], as_json: bool
) -> list[LayerReport]:
    """Convert under a progress bar (none with --json); returns the solved layers' reports."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    imatrix = load_imatrix(opts.imatrix) if opts.imatrix else None
    done: list[PlannedTensor] = []
    reports: list[LayerReport] = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=as_json,
        transient=True,  # an error then stays the one line printed
    ) as bar:
        task = bar.add_task(f"{ckpt.path.name} -> {out.name}", total=len(plan), info="")

        def advance(t: PlannedTensor) -> None:
            done.append(t)
            src = int(np.prod(t.shape)) * 2  # bf16/f16 source
            info = f"{t.name} {t.type} {src / 2**20:.1f}->{t.nbytes / 2**20:.1f} MiB, {bits_per_weight(done):.2f} bpw"
            bar.update(task, advance=1, info=info)

        def layer_done(rep: LayerReport) -> None:
            reports.append(rep)
            if not as_json and len(reports) == 1:
                bar.console.print(devices_line(rep.devices), highlight=False)
            if not as_json:
                bar.console.print(layer_line(opts.method, rep, opts.cal.damp))

        def step_done(rep: DistillReport) -> None:
            if as_json:
                return
            if isinstance(rep, BlockReport):
                bar.console.print(block_line(rep, opts.distill.block_steps))
            elif rep.heldout_kld is not None or rep.step % 10 == 0:
                bar.console.print(distill_line(rep, opts.distill.steps))

        convert(
            ckpt,
            out,
            opts,
            imatrix,
            progress=advance,
            layer_report=layer_done,
            plan=plan,
            distill_report=step_done,
        )
    return reports


def budget_json(bp: BudgetPlan) -> dict[str, object]:
    return {
        "budget": bp.budget,
        "file_bytes": bp.allocation.file_bytes,
        "predicted_kld": bp.allocation.predicted_loss,
        "sensitivity": bp.sensitivity.key,
        "sensitivity_cached": bp.cached,
        "sensitivity_seconds": bp.sensitivity.seconds,
    }


def budget_line(bp: BudgetPlan) -> str:
    a, s = bp.allocation, bp.sensitivity
    how = (
        "cached"
        if bp.cached
        else f"measured in {s.seconds.get('calibration_pass', 0) + s.seconds.get('probes', 0):.1f} s"
    )
    return (
        f"budget {format_size(bp.budget)}: plan {format_size(a.file_bytes)} "
        f"({100 * (bp.budget - a.file_bytes) / bp.budget:.2f} % under), predicted mean KLD {a.predicted_loss:.6f} "
        f"(sensitivity {s.key}, {how})"
    )


def check_memory(ckpt: Checkpoint, opts: ConvertOptions) -> None:
    """A --max-memory below what one solver layer needs: one line before any work."""
    if opts.kind.needs_calibration:
        cal = opts.cal
        sopts = SolverOptions(method=opts.method, max_memory=solver_memory(cal))
        fit_memory(sopts, ckpt.hparams, cal.nsamples, cal.seqlen)


def run_cli(
    model: str,
    output: Path | None,
    opts: ConvertOptions,
    dry_run: bool,
    as_json: bool,
    force: bool,
    budget: BudgetRequest | None = None,
) -> None:
    from rich.console import Console

    ckpt = Checkpoint(resolve(model))
    out = output or Path(default_output_name(ckpt, opts.file_type))
    bp = None
    if budget is not None:
        err = Console(stderr=True)
        bp = plan_budget(
            ckpt, opts, budget, None if as_json else lambda line: err.print(line, highlight=False)
        )
        opts = bp.opts
    plan = make_plan(ckpt, opts)  # refuses what the solver cannot target before any output
    check_memory(ckpt, opts)
    if dry_run:
        if as_json:
            extra = {"budget": budget_json(bp)} if bp else {}
            print(json.dumps({"output": str(out), "tensors": plan_json(plan), **extra}, indent=2))
        else:
            _print_plan(plan)
            if bp:
                print(budget_line(bp))
        return
    if out.exists() and not force:
        raise ConvertError(f"{out}: already exists (use --force to overwrite)")
    reports = _write(ckpt, out, opts, plan, as_json)
    if bp and not as_json:
        Console(stderr=True).print(budget_line(bp), highlight=False)
    if not as_json:
        Console(stderr=True).print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {len(plan)} tensors)")
        return
    result: dict[str, Any] = {
        "output": str(out),
        "bytes": out.stat().st_size,
        "payload_bytes": sum(t.nbytes for t in plan),
        "method": opts.method,
        "tensors": plan_json(plan),
    }
    if bp:
        result["budget"] = budget_json(bp)
    if reports:
        result["layers"] = [layer_json(r) for r in reports]
    print(json.dumps(result, indent=2))
