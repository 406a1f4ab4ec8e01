"""`ggq convert`: a Qwen3 Hugging Face checkpoint to a GGUF file, tensor by tensor.

Reads one tensor at a time, decides its ggml type by the recipe (llama-quantize's rules),
encodes it with ggq's own block encoders (RTN), or takes the blocks the calibration solvers
(GPTQ, AWQ, AWQ+GPTQ) return layer by layer, and streams it into an atomic GGUF writer.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ggq import calib, ggml
from ggq.checkpoint import Checkpoint
from ggq.errors import GGQError
from ggq.files import sha256_file
from ggq.gguf.metadata import Provenance, model_kv, name_and_size
from ggq.gguf.writer import GGUFWriter
from ggq.imatrix import save_imatrix
from ggq.plan import recipe
from ggq.plan.recipe import FileType
from ggq.solvers.method import CALIBRATED, METHODS, Method, calibrated_list, method
from ggq.solvers.options import (
    HEAD,
    DistillOptions,
    DistillReport,
    LayerReport,
    SolverOptions,
    check_device,
    check_distill,
    check_targets,
    default_max_memory,
    head_tensor,
    resolve_device,
)

if TYPE_CHECKING:
    from ggq.solvers.layerwise import LayerResult


class ConvertError(GGQError, ValueError):
    """A conversion that cannot proceed; the message names the option, file or tensor at fault."""


@dataclass(frozen=True)
class CalibOptions:
    calib: Path | None = None  # calibration text (gptq, awq); None = the text shipped with ggq
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    damp: float = 0.01
    act_order: bool = False  # GPTQ column order (gptq, awq+gptq)
    device: str = "auto"  # torch device of the calibration: auto (cuda when there is one), cpu, cuda
    dataset: str | None = None  # a named data set (calib.DATASETS) instead of a text file
    # bytes the solver may use (--max-memory; the bytes written do not depend on it); None: a
    # fraction of the available memory (options.default_max_memory)
    max_memory: int | None = None


@dataclass(frozen=True)
class ConvertOptions:
    recipe: recipe.RecipeOptions = field(default_factory=recipe.RecipeOptions)
    method: str = "rtn"
    imatrix: Path | None = None
    threads: int = 0  # 0 = all cores
    cal: CalibOptions = field(default_factory=CalibOptions)
    save_imatrix: Path | None = None  # llama.cpp imatrix of the calibration inputs (not with rtn)
    # per-tensor types (GGUF name, type) over the recipe's, e.g. a size-budget plan (ggq.plan.budget)
    tensor_overrides: tuple[tuple[str, str], ...] = ()
    plan_kv: tuple[tuple[str, int | float | str], ...] = ()  # written as ggq.plan.KEY
    distill: DistillOptions = field(default_factory=DistillOptions)  # after the solver (solvers/distill.py)

    @property
    def kind(self) -> Method:
        return method(self.method)

    @property
    def file_type(self) -> FileType:
        """The recipe, resolved (aliases such as Q4_K -> Q4_K_M)."""
        return recipe.file_type(self.recipe.file_type)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # ggml order (ne[0] = row length first)
    type: str
    nbytes: int


def ggml_shape(hf_shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(reversed(hf_shape))


def tensor_specs(ckpt: Checkpoint) -> list[recipe.TensorSpec]:
    """The tensors of the file, in file order, with the type they have before quantization."""
    specs = []
    for name in ckpt.gguf_order():
        shape = ggml_shape(ckpt.entries[name].shape)
        specs.append(recipe.TensorSpec(name, shape, "F32"))
    return specs


def make_plan(ckpt: Checkpoint, opts: ConvertOptions) -> list[PlannedTensor]:
    hp = ckpt.hparams
    _check_moe(ckpt, opts)  # every path (convert, --dry-run) plans first: refused before any work
    shape = recipe.ModelShape(hp.n_layer, hp.n_head, hp.n_head_kv, n_expert=hp.n_expert)
    specs = tensor_specs(ckpt)
    types = recipe.plan(specs, shape, opts.recipe)
    for name, qtype in opts.tensor_overrides:
        if name not in types:
            raise ConvertError(f"type override for {name}: no such tensor in {ckpt.path.name}")
        types[name] = recipe.tensor_type(qtype)
    if opts.method in METHODS and opts.kind.needs_calibration:
        check_targets(types, opts.method)  # a type the solver cannot target: refused before any output
    return [PlannedTensor(s.name, s.shape, types[s.name], ggml.nbytes(types[s.name], s.shape)) for s in specs]


def _check_moe(ckpt: Checkpoint, opts: ConvertOptions) -> None:
    """MoE: RTN, gptq, awq and awq+gptq (per expert, on the tokens the router sends it:
    solvers/layerwise.py solve_experts, solvers/moe.py), --save-imatrix with llama-imatrix's
    per-expert entries. --distill's student forward does not route to experts yet."""
    if not ckpt.arch.is_moe or opts.method not in METHODS or not opts.kind.needs_calibration:
        return
    if opts.distill.on:
        raise ConvertError(f"--distill: not yet for {ckpt.arch.hf_name} (the student has no expert routing)")


def bits_per_weight(tensors: list[PlannedTensor]) -> float:
    n = sum(int(np.prod(t.shape)) for t in tensors)
    return 8.0 * sum(t.nbytes for t in tensors) / n if n else 0.0


def default_output_name(ckpt: Checkpoint, file_type: FileType) -> str:
    basename, size = name_and_size(ckpt)
    return f"{basename}-{size}-{file_type.name}.gguf"


CHUNK_VALUES = 1 << 20  # 4 MiB of float32 per chunk: memory is bounded by chunks in flight, not the model


def encode_tensor(values: np.ndarray, type_name: str, imatrix: np.ndarray | None) -> np.ndarray:
    """RTN: ggml's own reference quantization of a (rows, n_per_row) float32 tensor."""
    rows = values.reshape(-1, values.shape[-1]) if values.ndim > 1 else values.reshape(1, -1)
    return ggml.quantize(rows, type_name, imatrix)


def _encode_rows(
    ckpt: Checkpoint, t: PlannedTensor, start: int, stop: int, imatrix: np.ndarray | None
) -> np.ndarray:
    values = ckpt.load(t.name, start, stop)
    if not np.isfinite(values).all():
        bad = int(np.count_nonzero(~np.isfinite(values)))
        row = start + int(np.argwhere(~np.isfinite(values))[0][0])  # a merged tensor's row: its expert
        raise ConvertError(f"{ckpt.source_name(t.name, row)}: {bad} NaN/Inf values in the checkpoint")
    if imatrix is not None and imatrix.ndim == 2:  # (n_expert, n_per_row): each expert its own
        if values.ndim != 3 or imatrix.shape[0] != ckpt.hparams.n_expert:
            raise ConvertError(f"--imatrix: {t.name} has {imatrix.shape[0]} importance rows (experts)")
        return np.concatenate([encode_tensor(v, t.type, imatrix[start + k]) for k, v in enumerate(values)])
    return encode_tensor(values, t.type, imatrix)


def encoded_chunks(
    ckpt: Checkpoint, t: PlannedTensor, imatrix: np.ndarray | None, pool: ThreadPoolExecutor, ahead: int
) -> Iterator[np.ndarray]:
    """The tensor's bytes in order, a block of whole rows at a time (every encoder works row by
    row), encoded by the pool's threads (numpy releases the GIL) with a bounded window in flight."""
    entry = ckpt.entries[t.name]
    step = max(1, CHUNK_VALUES // max(1, int(np.prod(entry.shape[1:]))))
    window: deque[Future[np.ndarray]] = deque()
    for start in range(0, entry.n_rows, step):
        window.append(pool.submit(_encode_rows, ckpt, t, start, start + step, imatrix))
        if len(window) > ahead:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()


@dataclass(frozen=True)
class SolverInput:
    """What the calibration solvers start from: the token windows, the torch device, and the
    provenance the file records (``ggq.calibration.*``)."""

    windows: calib.Calibration
    device: str
    provenance: dict[str, object]


def prepare_calibration(ckpt: Checkpoint, opts: ConvertOptions) -> SolverInput:
    """Resolve the device and sample the calibration windows (the text, or a named data set)."""
    device = resolve_device(opts.cal.device)
    cal, tokenizer = opts.cal, ckpt.path / "tokenizer.json"
    if cal.dataset:
        windows = calib.sample_dataset(tokenizer, cal.dataset, cal.nsamples, cal.seqlen, cal.seed)
    else:
        text = cal.calib or calib.default_text()
        windows = calib.sample_windows(tokenizer, text, cal.nsamples, cal.seqlen, cal.seed)
    provenance: dict[str, object] = {
        "file": windows.source,
        "sha256": windows.sha256,
        "nsamples": cal.nsamples,
        "seqlen": cal.seqlen,
        "seed": cal.seed,
        "damp": cal.damp,
        **({"act_order": cal.act_order} if opts.kind.uses_gptq else {}),
        **(_distill_provenance(opts.distill) if opts.distill.on else {}),
    }
    return SolverInput(windows, device, provenance)


def solved_layers(
    ckpt: Checkpoint,
    plan: list[PlannedTensor],
    prepared: SolverInput,
    opts: ConvertOptions,
    report: Callable[[LayerReport], None] | None,
    act_sums: dict[str, tuple[np.ndarray, int | np.ndarray]],
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Per layer, in order: (layer, {GGUF name: bytes}) of every tensor the solver changed
    (quantized linears; with AWQ also the norms and float linears it folded into).
    ``act_sums`` collects each linear's (sum of x^2 per input column, tokens)."""
    types = {t.name: t.type for t in plan}
    cal = opts.cal
    sopts = SolverOptions(
        method=opts.method,
        damp=cal.damp,
        act_order=cal.act_order,
        device=prepared.device,
        max_memory=solver_memory(cal),
    )
    for i, result in solve_layers(ckpt, prepared.windows.tokens, types, sopts, report):
        if i == HEAD:  # the output head, after the last layer (full GGUF names)
            yield i, dict(result.tensors)
            continue
        act_sums.update({f"blk.{i}.{name}.weight": v for name, v in result.act_sums.items()})
        yield i, {f"blk.{i}.{name}.weight": data for name, data in result.tensors.items()}


def solver_memory(cal: CalibOptions) -> int:
    """The solver's memory budget in bytes: --max-memory, or its default."""
    return cal.max_memory if cal.max_memory is not None else default_max_memory()


def _distill_provenance(d: DistillOptions) -> dict[str, object]:
    return {
        "distill_steps": d.steps,
        "distill_lr": d.lr,
        "distill_norm_lr": d.norm_lr,
        "distill_seed": d.seed,
        **({"distill_block_steps": d.block_steps, "distill_block_lr": d.block_lr} if d.block_steps else {}),
    }


def distilled(
    ckpt: Checkpoint,
    plan: list[PlannedTensor],
    solved: Iterator[tuple[int, dict[str, np.ndarray]]],
    prepared: SolverInput,
    opts: DistillOptions,
    report: Callable[[DistillReport], None] | None,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """The solver's layers distilled end to end (solvers/distill.py, imported on first use)."""
    from ggq.solvers import distill

    types = {t.name: t.type for t in plan}
    return distill.distilled_layers(
        ckpt, types, solved, prepared.windows.tokens, opts, prepared.device, report
    )


def solve_layers(
    ckpt: Checkpoint,
    tokens: np.ndarray,
    types: dict[str, str],
    opts: SolverOptions,
    report: Callable[[LayerReport], None] | None,
) -> Iterator[tuple[int, LayerResult]]:
    """The layer-by-layer solver, imported on first use: it loads torch, which RTN never needs."""
    from ggq.solvers import layerwise

    return layerwise.solve_layers(ckpt, tokens, types, opts, report)


def _layer_of(name: str) -> int | None:
    return int(name.split(".")[1]) if name.startswith("blk.") else None


def _write_data(
    writer: GGUFWriter,
    ckpt: Checkpoint,
    plan: list[PlannedTensor],
    solved: Iterator[tuple[int, dict[str, np.ndarray]]] | None,
    imatrix: dict[str, np.ndarray] | None,
    threads: int,
    progress: Callable[[PlannedTensor], None] | None,
) -> None:
    """Every tensor in plan order: a layer's solved tensors as the solver returns them (one layer
    at a time), the rest encoded here by RTN a block of rows at a time."""
    layer: dict[str, np.ndarray] = {}
    current: int | None = None
    head = head_tensor({t.name: t.type for t in plan}) if solved is not None else None
    with ThreadPoolExecutor(threads) as pool:
        for t in plan:
            if solved is not None and _layer_of(t.name) != current:
                if layer:
                    raise ConvertError(f"solved tensors not in the plan of layer {current}: {sorted(layer)}")
                current = _layer_of(t.name)
                layer = _next_layer(solved, current) if current is not None else {}
            if t.name in layer:
                writer.write_tensor(t.name, layer.pop(t.name))
            elif t.name == head:  # solved after the last layer: its place is filled then
                writer.defer_tensor(t.name)
            else:
                imat = imatrix.get(t.name) if imatrix and not ggml.is_float(t.type) else None
                writer.write_tensor(t.name, encoded_chunks(ckpt, t, imat, pool, threads))
            if progress and t.name != head:
                progress(t)
        if head is not None and solved is not None:
            tensors = _next_layer(solved, HEAD)
            if set(tensors) != {head}:
                raise ConvertError(
                    f"the solver returned {sorted(tensors)} where the plan has the head {head}"
                )
            writer.fill_tensor(head, tensors[head])
            if progress:
                progress(next(t for t in plan if t.name == head))


def _next_layer(solved: Iterator[tuple[int, dict[str, np.ndarray]]], expected: int) -> dict[str, np.ndarray]:
    i, tensors = next(solved, (None, {}))
    if i != expected:
        raise ConvertError(f"the solver returned layer {i} where the plan has layer {expected}")
    return tensors


def convert(
    ckpt: Checkpoint,
    out: Path,
    opts: ConvertOptions,
    imatrix: dict[str, np.ndarray] | None = None,
    progress: Callable[[PlannedTensor], None] | None = None,
    layer_report: Callable[[LayerReport], None] | None = None,
    plan: list[PlannedTensor] | None = None,
    distill_report: Callable[[DistillReport], None] | None = None,
) -> list[PlannedTensor]:
    """Write ``out`` (and ``opts.save_imatrix``); returns the plan that was written (``plan``:
    one ``make_plan`` already made for these options, else it is made here)."""
    if opts.method not in METHODS:
        raise ConvertError(f"--method {opts.method}: unknown; known: {', '.join(METHODS)}")
    _check_save_imatrix(opts.method, opts.save_imatrix)
    plan = make_plan(ckpt, opts) if plan is None else plan
    prepared = prepare_calibration(ckpt, opts) if opts.kind.needs_calibration else None
    act_sums: dict[str, tuple[np.ndarray, int | np.ndarray]] = {}
    solved = solved_layers(ckpt, plan, prepared, opts, layer_report, act_sums) if prepared else None
    if solved is not None and prepared is not None and opts.distill.on:
        solved = distilled(ckpt, plan, solved, prepared, opts.distill, distill_report)
    with GGUFWriter(out) as writer:
        _add_header(writer, file_kv(ckpt, opts, prepared.provenance if prepared else {}), plan)
        writer.begin_data()
        _write_data(writer, ckpt, plan, solved, imatrix, opts.threads or os.cpu_count() or 1, progress)
        writer.finish()
    if opts.save_imatrix and prepared:
        source = prepared.windows.source
        save_imatrix(opts.save_imatrix, act_sums, [source], opts.cal.nsamples, opts.cal.seqlen)
    return plan


def file_kv(ckpt: Checkpoint, opts: ConvertOptions, calibration: dict[str, object]) -> dict[str, object]:
    """Every key/value the file gets, in order (``calibration``: SolverInput.provenance, or {})."""
    prov = Provenance(
        method=opts.method,
        recipe=opts.file_type.name,
        imatrix_file=opts.imatrix.name if opts.imatrix else None,
        imatrix_sha256=sha256_file(opts.imatrix) if opts.imatrix else None,
        calibration=calibration,
    )
    kv = model_kv(ckpt, opts.file_type.llama_ftype, prov)
    kv.update({f"ggq.plan.{key}": value for key, value in opts.plan_kv})
    return kv


def _add_header(writer: GGUFWriter, kv: dict[str, object], plan: list[PlannedTensor]) -> None:
    for key, value in kv.items():
        writer.add_kv(key, value)
    for t in plan:
        writer.add_tensor_info(t.name, t.shape, ggml.ggml_type(t.type).type_id, t.nbytes)


def file_size(kv: dict[str, object], plan: list[PlannedTensor]) -> int:
    """The bytes ``convert`` writes for this plan and these key/values, computed without writing."""
    writer = GGUFWriter(Path("unwritten.gguf"))
    _add_header(writer, kv, plan)
    return writer.file_size()


def cli_options(
    file_type: str,
    method: str,
    imatrix: Path | None,
    pure: bool,
    tensor_types: tuple[tuple[str, str], ...],
    output_tensor_type: str | None,
    token_embedding_type: str | None,
    leave_output_tensor: bool,
    threads: int = 0,
    cal: CalibOptions | None = None,
    save_imatrix: Path | None = None,
    distill: DistillOptions | None = None,
) -> ConvertOptions:
    """Validate the command-line choices into ConvertOptions (names checked early, before any work)."""
    recipe.file_type(file_type)
    cal = cal or CalibOptions()
    check_device(cal.device)
    if cal.device == "cuda" or method in CALIBRATED:
        resolve_device(cal.device)  # --device cuda without CUDA: one line before anything is read
    if cal.dataset:
        if cal.calib:
            raise ConvertError("--calib and --calib-dataset: give one of them")
        calib.check_dataset(cal.dataset)
    _check_save_imatrix(method, save_imatrix)
    distill = distill or DistillOptions()
    if distill.on and method not in CALIBRATED:
        raise ConvertError(
            f"--distill: starts from a calibration method's file ({calibrated_list()}), not {method}"
        )
    check_distill(distill, cal.nsamples)
    for _, qtype in tensor_types:
        recipe.tensor_type(qtype)
    for t in (output_tensor_type, token_embedding_type):
        if t:
            recipe.tensor_type(t)
    ropts = recipe.RecipeOptions(
        file_type=file_type,
        pure=pure,
        tensor_types=tensor_types,
        output_tensor_type=output_tensor_type,
        token_embedding_type=token_embedding_type,
        leave_output_tensor=leave_output_tensor,
        has_imatrix=imatrix is not None,
    )
    return ConvertOptions(
        recipe=ropts,
        method=method,
        imatrix=imatrix,
        threads=threads,
        cal=cal,
        save_imatrix=save_imatrix,
        distill=distill,
    )


def _check_save_imatrix(name: str, save_imatrix: Path | None) -> None:
    if save_imatrix and name in METHODS and not METHODS[name].needs_calibration:
        raise ConvertError(f"--save-imatrix: needs calibration activations (--method {calibrated_list()})")
