"""`ggq ppl` on the terminal: a progress bar per model, then a results table or JSON."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ggq.eval.perplexity import (
    DEFAULT_TEXT,
    ChunkProgress,
    PerplexityConfig,
    PerplexityError,
    PerplexityResult,
    check_model_file,
    load_text,
    prepare,
    run,
)

USER_ERRORS: tuple[type[Exception], ...] = (PerplexityError,)


def result_dict(r: PerplexityResult) -> dict[str, Any]:
    return {**asdict(r), "tokens_per_second": r.tokens_per_second}


def _updater(bar: Any, task: Any) -> Callable[[ChunkProgress], None]:
    def update(p: ChunkProgress) -> None:
        bar.update(task, completed=p.done, total=p.total, ppl=f"PPL {p.ppl:.4f}")

    return update


def run_cli(models: Sequence[Path], text_file: Path | None, config: PerplexityConfig, as_json: bool) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    text = load_text(text_file)
    source = str(text_file or DEFAULT_TEXT)
    for path in models:  # every file checked before the first one costs minutes
        check_model_file(path, config.n_ctx)
    results = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[ppl]}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=as_json,
    ) as bar:
        for path in models:
            prepared = prepare(path, text, config, source)  # bad input fails before its bar shows
            task = bar.add_task(path.name, total=prepared.n_chunks, ppl="")
            results.append(run(prepared, _updater(bar, task)))
            del prepared  # one model in memory at a time
    if as_json:
        print(json.dumps({"text": source, "results": [result_dict(r) for r in results]}, indent=2))
        return
    names = [Path(r.model).name for r in results]
    labels = names if len(set(names)) == len(names) else [r.model for r in results]
    table = Table(title=f"perplexity of {source}")
    table.add_column("model", overflow="fold")
    for name in ("chunks", "ctx", "scored", "PPL", "±", "tok/s"):
        table.add_column(name, justify="right")
    for label, r in zip(labels, results, strict=True):
        table.add_row(
            label,
            str(r.n_chunks),
            str(r.n_ctx),
            f"{r.n_scored:,}",
            f"{r.ppl:.4f}",
            f"{r.ppl_err:.5f}",
            f"{r.tokens_per_second:,.0f}",
        )
    Console().print(table)
