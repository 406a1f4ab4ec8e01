"""Command line: parses options and calls the library."""

from __future__ import annotations

import json
import sys

import click

from ggq import __version__


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


if __name__ == "__main__":
    main()
