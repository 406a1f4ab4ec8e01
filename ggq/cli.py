"""Command line: parses options and calls the library."""

from __future__ import annotations

import json
import math
import signal
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from ggq import __version__
from ggq.errors import GGQError
from ggq.gguf.writer import check_output_path
from ggq.plan.recipe import BITS_RECIPES
from ggq.signals import SIGNAL_EXITS, SignalGuard, Terminated
from ggq.solvers.method import METHODS
from ggq.solvers.options import DistillOptions

MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ: ppl's n_batch // n_ctx chunks decode side by side


class UserError(click.ClickException):
    """Bad input (file, tensor, option): one line on stderr, exit code 2 like a usage error."""

    exit_code = 2


# commands that read and write the user's files, where an OSError (a missing or unreadable input,
# a full disk) is said in one line; elsewhere it stays a traceback
OS_ERRORS_ARE_USERS = frozenset({"convert", "study"})
_GUARD = "ggq.signal_guard"  # click Context.meta key: the command's SignalGuard


def _guard() -> SignalGuard | None:
    guard = click.get_current_context().meta.get(_GUARD)
    return guard if isinstance(guard, SignalGuard) else None


class _Group(click.Group):
    """Runs a command under the signal guard; any GGQError (and, for the commands in
    ``OS_ERRORS_ARE_USERS``, an OSError) becomes one line on stderr and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        guard = SignalGuard()
        ctx.meta[_GUARD] = guard
        try:
            with guard:
                return super().invoke(ctx)
        except (KeyboardInterrupt, Terminated) as exc:
            code, word = SIGNAL_EXITS[signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM]
            click.echo(word, err=True)
            raise click.exceptions.Exit(code) from None
        except GGQError as exc:
            raise UserError(str(exc)) from exc
        except OSError as exc:
            if ctx.invoked_subcommand not in OS_ERRORS_ARE_USERS:
                raise
            raise UserError(str(exc)) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ggq")
def main() -> None:
    """ggq: Qwen3 checkpoints to llama.cpp GGUF files, quantized by RTN, GPTQ or AWQ."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def info(as_json: bool) -> None:
    """Versions, the llama.cpp build, back ends and devices."""
    from ggq import info as info_mod

    report = info_mod.collect()
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        info_mod.render(report)
    if report.get("native_error"):
        sys.exit(1)


def _finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """click's FloatRange lets NaN and inf through (every comparison with NaN is false)."""
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", ctx=ctx, param=param)
    return value


def _csv(value: str, option: str, known: Iterable[str]) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise UserError(f"{option} {value!r}: empty; give one or more of {', '.join(known)}")
    return items


def _bpw_list(value: str) -> tuple[float, ...]:
    """``--budgets 3.5,4.0``: bits per weight (empty: none)."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    try:
        return tuple(float(v) for v in items)
    except ValueError:
        raise UserError(
            f"--budgets {value!r}: expected comma-separated bits per weight, e.g. 3.5,4.0,4.5"
        ) from None


def _steps_option(flag: str, dest: str, help: str) -> Any:
    """A distillation phase's step count: 0 (the default) turns it off."""
    return click.option(
        flag, dest, type=click.IntRange(min=0), default=0, show_default=True, metavar="STEPS", help=help
    )


def _parse_tensor_types(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for v in values:
        pattern, sep, qtype = v.rpartition("=")
        if not sep or not pattern or not qtype:
            raise click.BadParameter(
                f"{v!r}: expected REGEX=TYPE, e.g. 'attn_v=Q8_0'", param_hint="--tensor-type"
            )
        pairs.append((pattern, qtype))
    return tuple(pairs)


@main.command()
@click.argument("model")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Output GGUF (default: llama.cpp's naming, e.g. Qwen3-0.6B-Q4_K_M.gguf).",
)
@click.option(
    "--type",
    "file_type",
    help="File type recipe, as llama-quantize names them (Q4_K_M, Q4_0, Q8_0, F16, ...); default Q4_K_M.",
)
@click.option("--method", type=click.Choice(list(METHODS)), default="rtn", show_default=True)
@click.option(
    "--imatrix",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="llama.cpp imatrix GGUF: importance weights for the encoders.",
)
@click.option(
    "--pure", is_flag=True, help="Every quantizable tensor in the default type (no per-tensor rules)."
)
@click.option(
    "--tensor-type",
    "tensor_types",
    multiple=True,
    metavar="REGEX=TYPE",
    help="Override the type of tensors whose name matches REGEX.",
)
@click.option("--output-tensor-type", help="Type of output.weight.")
@click.option("--token-embedding-type", help="Type of token_embd.weight.")
@click.option("--leave-output-tensor", is_flag=True, help="Keep output.weight unquantized.")
@click.option("--dry-run", is_flag=True, help="Print the tensor-type plan and write nothing.")
@click.option(
    "--target-size",
    metavar="SIZE",
    help="Choose each tensor's type so that the whole file fits SIZE with the least predicted KLD: "
    "bytes, or K/M/G = KiB/MiB/GiB (1024-based, e.g. 7.42M, 4.2G).",
)
@click.option(
    "--target-bpw",
    type=float,
    help="Like --target-size, as bits per weight of the whole file (B * weights / 8 bytes).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan / result as JSON.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option(
    "-t", "--threads", type=click.IntRange(min=0), default=0, help="Encoder threads (0 = all cores)."
)
@click.option(
    "--bits",
    type=click.Choice(list(BITS_RECIPES)),
    help="Recipe by bits: 2 Q2_K, 3 Q3_K_M, 4 Q4_K_M, 5 Q5_K_M, 6 Q6_K, 8 Q8_0 (--type wins).",
)
@click.option(
    "--calib",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Calibration text (gptq, awq); default: the public-domain text shipped with ggq.",
)
@click.option(
    "--calib-dataset",
    metavar="NAME",
    help="Instead of --calib: a named data set read through the datasets package, online "
    "(wikitext2, c4, pile).",
)
@click.option(
    "--nsamples", type=click.IntRange(min=1), default=128, show_default=True, help="Calibration windows."
)
@click.option(
    "--seqlen", type=click.IntRange(min=8), default=512, show_default=True, help="Tokens per window."
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the calibration window sampling."
)
@click.option(
    "--damp",
    type=click.FloatRange(min=0, min_open=True),
    callback=_finite,
    default=0.01,
    show_default=True,
    help="GPTQ damping, a fraction of the mean Hessian diagonal.",
)
@click.option(
    "--act-order",
    is_flag=True,
    help="GPTQ (gptq, awq+gptq): quantize columns by decreasing activation energy.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Torch device of the calibration forward passes and statistics (auto: cuda when torch sees one).",
)
@click.option(
    "--max-memory",
    metavar="SIZE",
    help="Memory the solver may use (gptq, awq): bytes, or K/M/G = KiB/MiB/GiB; the batch and where the "
    "activations are kept follow from it, the bytes written do not. Default: 3/4 of the available memory.",
)
@click.option(
    "--save-imatrix",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write llama.cpp's imatrix GGUF of the calibration inputs each linear sees (gptq, awq).",
)
@_steps_option(
    "--distill",
    "distill_steps",
    "After gptq/awq/awq+gptq: train the file's codes and norms end to end against the full-precision "
    "model (KL divergence on the calibration windows, the best state on a held-out eighth kept); 0 = off.",
)
@click.option(
    "--distill-lr",
    type=float,
    default=DistillOptions.lr,
    show_default=True,
    help="Distillation step: how far the code indices move per step on average (in codes), decayed to 0.",
)
@click.option(
    "--distill-norm-lr",
    type=float,
    default=DistillOptions.norm_lr,
    show_default=True,
    help="Distillation: Adam's step size on the F32 norm weights (0: the norms stay).",
)
@_steps_option(
    "--distill-blocks",
    "distill_blocks",
    "Before --distill's end-to-end phase: STEPS per decoder layer training its codes, Q4_0/Q5_0/Q8_0/IQ4_NL "
    "block scales and norms to reproduce the float layer's output; 0 = off.",
)
@click.option(
    "--distill-block-lr",
    type=float,
    default=DistillOptions.block_lr,
    show_default=True,
    help="The block-wise phase's sign step on the code indices (in codes), decayed to 0.",
)
def convert(
    model: str,
    output: Path | None,
    file_type: str,
    method: str,
    imatrix: Path | None,
    pure: bool,
    tensor_types: tuple[str, ...],
    output_tensor_type: str | None,
    token_embedding_type: str | None,
    leave_output_tensor: bool,
    dry_run: bool,
    as_json: bool,
    force: bool,
    threads: int,
    bits: str | None,
    calib: Path | None,
    calib_dataset: str | None,
    nsamples: int,
    seqlen: int,
    seed: int,
    damp: float,
    act_order: bool,
    device: str,
    max_memory: str | None,
    save_imatrix: Path | None,
    target_size: str | None,
    target_bpw: float | None,
    distill_steps: int,
    distill_lr: float,
    distill_norm_lr: float,
    distill_blocks: int,
    distill_block_lr: float,
) -> None:
    """Convert a Qwen3 Hugging Face checkpoint (directory or hub id) to GGUF."""
    from ggq import convert as conv
    from ggq import convert_cli
    from ggq.plan import budget as bud

    if target_size is not None and target_bpw is not None:
        raise UserError("--target-size and --target-bpw: give one of them")
    req = bud.BudgetRequest(target_size, target_bpw) if target_size or target_bpw is not None else None
    if target_size is not None:
        bud.parse_size(target_size)  # a bad unit fails before the checkpoint is read
    memory = bud.parse_size(max_memory, "--max-memory") if max_memory is not None else None

    file_type = file_type or BITS_RECIPES[bits or "4"]
    for target in (output, save_imatrix) if not dry_run else ():
        if target is not None:
            check_output_path(target)  # an unwritable target fails now, not after the solver
    convert_cli.run_cli(
        model,
        output,
        conv.cli_options(
            file_type,
            method,
            imatrix,
            pure,
            _parse_tensor_types(tensor_types),
            output_tensor_type,
            token_embedding_type,
            leave_output_tensor,
            threads,
            conv.CalibOptions(
                calib, nsamples, seqlen, seed, damp, act_order, device, calib_dataset, max_memory=memory
            ),
            save_imatrix,
            DistillOptions(
                steps=distill_steps,
                lr=distill_lr,
                norm_lr=distill_norm_lr,
                seed=seed,
                block_steps=distill_blocks,
                block_lr=distill_block_lr,
            ),
        ),
        dry_run=dry_run,
        as_json=as_json,
        force=force,
        budget=req,
    )


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-f",
    "--file",
    "text_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="UTF-8 text to evaluate (default: the WikiText-2 raw test split shipped with ggq).",
)
@click.option("-c", "--ctx-size", "n_ctx", type=click.IntRange(min=4), default=512, show_default=True)
@click.option("--chunks", "n_chunks", type=click.IntRange(min=1), help="Evaluate at most N chunks.")
@click.option(
    "-b",
    "--batch-size",
    "n_batch",
    type=click.IntRange(min=1),
    default=2048,
    show_default=True,
    help="Tokens per decode call; n_batch // ctx chunks are evaluated side by side, as llama-perplexity does.",
)
@click.option("-t", "--threads", type=click.IntRange(min=0), default=0, help="CPU threads (0 = all cores).")
@click.option(
    "--dataset",
    help="A text shipped with ggq instead of -f: wikitext-2 (the WikiText-2 raw test split, the default).",
)
@click.option(
    "-ngl",
    "--gpu-layers",
    "n_gpu_layers",
    type=int,
    default=-1,
    show_default=True,
    help="Layers on the GPU (-1: all where there is one, as llama.cpp; > 0 without a GPU is an error).",
)
@click.option(
    "--base",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Reference GGUF (e.g. the F32/BF16 file): adds llama-perplexity's KL-divergence statistics, "
    "computed in one pass over both models.",
)
@click.option(
    "--vs-q4_0",
    "vs_q4_0",
    is_flag=True,
    help="Also evaluate the Q4_0 llama.cpp's own quantizer makes from --base (cached).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a PNG: KLD (with --base) or PPL against bits per weight, one marker per file.",
)
def ppl(
    models: tuple[Path, ...],
    text_file: Path | None,
    n_ctx: int,
    n_chunks: int | None,
    n_batch: int,
    threads: int,
    dataset: str | None,
    n_gpu_layers: int,
    base: Path | None,
    vs_q4_0: bool,
    as_json: bool,
    plot: Path | None,
) -> None:
    """Perplexity of GGUF models over a text, with llama-perplexity's protocol and numbers.

    With --base, also the KL-divergence of each model against the base, as
    llama-perplexity --kl-divergence computes it, without a logits file.
    """
    from ggq import ppl as ppl_mod
    from ggq.eval.perplexity import PerplexityConfig

    if n_batch // n_ctx > MAX_SEQUENCES:  # llama.cpp refuses the context; say why, not a traceback
        raise UserError(
            f"-b {n_batch} / -c {n_ctx}: {n_batch // n_ctx} chunks side by side, llama.cpp allows at most "
            f"{MAX_SEQUENCES}; lower -b or raise -c"
        )
    config = PerplexityConfig(
        n_ctx=n_ctx, n_batch=n_batch, n_chunks=n_chunks, n_threads=threads, n_gpu_layers=n_gpu_layers
    )
    if plot is not None:
        check_output_path(plot)
    ppl_mod.run_cli(
        models, text_file, config, as_json=as_json, base=base, vs_q4_0=vs_q4_0, plot=plot, dataset=dataset
    )


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-p", "--prompt", help="One-shot: answer this prompt on stdout (thinking on stderr) and exit.")
@click.option("--system", help="System message.")
@click.option(
    "--think/--no-think",
    default=True,
    show_default=True,
    help="Qwen3 thinking mode (also /think and /no_think in a message).",
)
@click.option(
    "--temp", "temperature", type=float, help="Sampling temperature (Qwen3: 0.6 thinking, 0.7 not)."
)
@click.option("--top-p", type=float, help="Nucleus sampling (Qwen3: 0.95 thinking, 0.8 not).")
@click.option("--top-k", type=int, help="Top-k sampling (Qwen3: 20).")
@click.option("--min-p", type=float, help="Min-p sampling (Qwen3: 0).")
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=2048, show_default=True)
@click.option("-c", "--ctx-size", "n_ctx", type=click.IntRange(min=64), default=4096, show_default=True)
@click.option(
    "-ngl", "--gpu-layers", "n_gpu_layers", type=int, default=-1, show_default=True, help="Layers on the GPU."
)
@click.option(
    "-t", "--threads", type=click.IntRange(min=0), default=0, help="CPU threads (0 = llama.cpp's default)."
)
@click.option("--seed", type=int, default=-1, show_default=True, help="Sampling seed (-1: random).")
@click.option("--ignore-eos", is_flag=True, help="Never end a reply early (as llama-cli's --ignore-eos).")
def chat(
    model: Path,
    prompt: str | None,
    system: str | None,
    think: bool,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    min_p: float | None,
    max_tokens: int,
    n_ctx: int,
    n_gpu_layers: int,
    threads: int,
    seed: int,
    ignore_eos: bool,
) -> None:
    """Chat with a GGUF model (llama.cpp through llama-cpp-python, the model's own chat template)."""
    from ggq import chat as chat_mod

    guard = _guard()
    if guard is not None:
        guard.interactive_sigint = True  # the REPL catches Ctrl-C to stop a reply; SIGTERM still ends
    sampling = chat_mod.Sampling(temperature, top_p, top_k, min_p, max_tokens, seed, ignore_eos)
    session = chat_mod.ChatSession(model, n_ctx, n_gpu_layers, threads, system, think, sampling)
    if prompt is not None:
        chat_mod.one_shot(session, prompt)
    else:
        chat_mod.repl(session)


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-p", "--n-prompt", type=click.IntRange(min=0), default=512, show_default=True, help="Prompt tokens (pp)."
)
@click.option(
    "-n", "--n-gen", type=click.IntRange(min=0), default=128, show_default=True, help="Generated tokens (tg)."
)
@click.option("-r", "--repetitions", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("-t", "--threads", type=click.IntRange(min=0), default=0, help="CPU threads (0 = all cores).")
@click.option(
    "-ngl", "--gpu-layers", "n_gpu_layers", type=int, default=-1, show_default=True, help="Layers on the GPU."
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench(
    models: tuple[Path, ...],
    n_prompt: int,
    n_gen: int,
    repetitions: int,
    threads: int,
    n_gpu_layers: int,
    as_json: bool,
) -> None:
    """Prompt and generation speed (llama-bench) and peak memory of GGUF files, side by side."""
    from ggq import bench as bench_mod

    if n_prompt == 0 and n_gen == 0:
        raise UserError("-p 0 and -n 0: nothing to measure")
    cfg = bench_mod.BenchConfig(n_prompt, n_gen, repetitions, threads, n_gpu_layers)
    bench_mod.run_cli(models, cfg, as_json)


@main.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--methods", default="rtn,gptq,awq", show_default=True, help=f"Comma-separated: {', '.join(METHODS)}."
)
@click.option(
    "--bits", default="2,3,4,5,8", show_default=True, help="Comma-separated bits; 2 Q2_K ... 8 Q8_0."
)
@click.option(
    "--budgets",
    default="",
    help="Comma-separated bits per weight, e.g. 3.5,4.0,4.5: per method a size-budget file (--target-bpw).",
)
@click.option(
    "-f",
    "--file",
    "texts",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Evaluation text (repeatable; default: WikiText-2 test).",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder (default study-MODEL).",
)
@click.option(
    "--base-type", default="F32", show_default=True, help="Full-precision reference: F32, F16 or BF16."
)
@click.option(
    "--calib", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Calibration text."
)
@click.option("--nsamples", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--seqlen", type=click.IntRange(min=8), default=512, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "-c",
    "--ctx-size",
    "n_ctx",
    type=click.IntRange(min=8),  # 2048-token batches: at most llama.cpp's 256 chunks side by side
    default=512,
    show_default=True,
)
@click.option("--chunks", type=click.IntRange(min=1), help="Evaluate at most N chunks of each text.")
@click.option("-t", "--threads", type=click.IntRange(min=0), default=0, help="CPU threads (0 = all cores).")
@click.option("--no-reference", is_flag=True, help="Skip llama.cpp's own RTN and imatrix rows.")
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Torch device of the solvers' calibration (as ggq convert --device; CUDA files are cached apart).",
)
@click.option(
    "--tasks",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of zero-shot task files (hellaswag*.txt, winogrande*.csv, *.bin multiple choice).",
)
def study(
    model: Path,
    methods: str,
    bits: str,
    budgets: str,
    texts: tuple[Path, ...],
    out: Path | None,
    base_type: str,
    calib: Path | None,
    nsamples: int,
    seqlen: int,
    seed: int,
    n_ctx: int,
    chunks: int | None,
    threads: int,
    no_reference: bool,
    device: str,
    tasks: Path | None,
) -> None:
    """The Qwen3 quantization study (arXiv 2505.02214) on GGUF: every method x bits, table, plots, JSON."""
    from rich.console import Console

    from ggq import calib as calib_mod
    from ggq import study as study_mod

    console = Console(stderr=True)
    cfg = study_mod.StudyConfig(
        model=model,
        methods=_csv(methods, "--methods", METHODS),
        bits=_csv(bits, "--bits", BITS_RECIPES),
        budgets=_bpw_list(budgets),
        texts=texts,
        out=out or Path(f"study-{model.name}"),
        base_type=base_type.upper(),
        calib=calib,
        nsamples=nsamples,
        seqlen=seqlen,
        seed=seed,
        n_ctx=n_ctx,
        chunks=chunks,
        threads=threads,
        references=not no_reference,
        tasks=tasks,
        device=device,
    )
    if calib is not None:  # a text that cannot serve fails before the base conversion
        calib_mod.read_text(calib)
    doc = study_mod.Study(cfg, log=lambda m: console.print(m, soft_wrap=True)).run()
    click.echo(study_mod.render_markdown(doc), nl=False)
    console.print(f"wrote {cfg.out / 'study.md'}, study.json, ppl.png, kld.png")


if __name__ == "__main__":
    main()
