"""Command line: parses options and calls the library."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ggq import __version__


class UserError(click.ClickException):
    """Bad input (file, tensor, option): one line on stderr, exit code 2 like a usage error."""

    exit_code = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    default="Q4_K_M",
    show_default=True,
    help="File type recipe, as llama-quantize names them (Q4_K_M, Q4_0, Q8_0, F16, ...).",
)
@click.option(
    "--method", type=click.Choice(["rtn", "gptq", "awq", "awq+gptq"]), default="rtn", show_default=True
)
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
@click.option("--json", "as_json", is_flag=True, help="Print the plan / result as JSON.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option(
    "-t", "--threads", type=click.IntRange(min=0), default=0, help="Encoder threads (0 = all cores)."
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
) -> None:
    """Convert a Qwen3 Hugging Face checkpoint (directory or hub id) to GGUF."""
    from ggq import convert as conv

    try:
        conv.run_cli(
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
            ),
            dry_run=dry_run,
            as_json=as_json,
            force=force,
        )
    except conv.USER_ERRORS as exc:
        raise UserError(str(exc)) from exc


if __name__ == "__main__":
    main()
