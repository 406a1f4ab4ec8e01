"""`ggq ppl` on the terminal: progress bars, then one results table (or JSON, or a plot).

Without ``--base`` each model is evaluated on its own, one in memory at a time. With ``--base``
the base and every model are loaded together and evaluated chunk by chunk in one pass, each
model's logits compared with the base's as they come (``eval.compare.against_base``);
``--vs-q4_0`` adds llama.cpp's own Q4_0 of the base to the models.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ggq import native
from ggq.eval.baseline import q4_0_baseline
from ggq.eval.compare import Row, Update, against_base
from ggq.eval.fileinfo import file_info, type_label
from ggq.eval.perplexity import (
    DEFAULT_TEXT,
    ChunkProgress,
    PerplexityConfig,
    PerplexityError,
    load_text,
    prepare,
    run,
)
from ggq.files import atomic_write
from ggq.gguf import check_model_file

DATASETS = {"wikitext-2": DEFAULT_TEXT}


def _progress(as_json: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=as_json,
    )


def _updater(bar: Any, task: Any) -> Callable[[ChunkProgress], None]:
    def update(p: ChunkProgress) -> None:
        bar.update(task, completed=p.done, total=p.total, info=f"PPL {p.ppl:.4f}")

    return update


def _plain_rows(
    models: Sequence[Path], text: bytes, source: str, config: PerplexityConfig, quiet: bool
) -> list[Row]:
    rows = []
    with _progress(quiet) as bar:
        for path in models:
            prepared = prepare(path, text, config, source)  # bad input fails before its bar shows
            task = bar.add_task(path.name, total=prepared.n_chunks, info="")
            rows.append(Row(path.name, "model", file_info(path), run(prepared, _updater(bar, task)), None))
            del prepared  # one model in memory at a time
    return rows


def _kld_updater(bar: Any, task: Any) -> Update:
    def update(done: int, total: int, running: list[tuple[float, float]]) -> None:
        bar.update(task, completed=done, total=total, info="  ".join(f"KLD {k:.5f}" for _, k in running))

    return update


def _render(rows: list[Row], source: str, has_base: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    base_ppl = rows[0].ppl.ppl if has_base else None
    title = f"perplexity of {Path(source).name}" + (
        f", KL-divergence against {rows[0].file}" if has_base else ""
    )
    table = Table(title=title)
    table.add_column("file", overflow="fold")
    table.add_column("type")
    for name in ("MiB", "bpw", "PPL"):
        table.add_column(name, justify="right")
    if has_base:
        for name in ("ΔPPL", "mean KLD", "same top p"):
            table.add_column(name, justify="right")
    table.add_column("tok/s", justify="right")
    for row in sorted(rows, key=lambda r: r.info.size_mib):
        cells = [
            row.file if row.role == "model" else f"{row.file} ({row.role})",
            type_label(row.info),
            f"{row.info.size_mib:,.1f}",
            f"{row.info.bpw:.2f}",
            f"{row.ppl.ppl:.4f} ± {row.ppl.ppl_err:.5f}",
        ]
        if base_ppl is not None:
            if row.kld is None:
                cells += ["", "", ""]
            else:
                d = row.ppl.ppl - base_ppl
                cells += [
                    f"{d:+.4f} ({100 * d / base_ppl:+.2f}%)",
                    f"{row.kld.kld:.6f} ± {row.kld.kld_err:.6f}",
                    f"{100 * row.kld.same_top:.2f} ± {100 * row.kld.same_top_err:.2f}%",
                ]
        cells.append(f"{row.ppl.tokens_per_second:,.0f}")
        table.add_row(*cells)
    Console().print(table)


def write_plot(rows: list[Row], out: Path, source: str) -> None:
    """KLD (with a base) or PPL against bits per weight, one labelled marker per file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_kld = any(r.kld is not None for r in rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        if use_kld and row.kld is None:
            continue  # the base: KLD 0 by definition
        y = row.kld.kld if use_kld and row.kld is not None else row.ppl.ppl
        marker = {"base": "*", "llama.cpp Q4_0": "s"}.get(row.role, "o")
        ax.scatter([row.info.bpw], [y], marker=marker, s=50)
        ax.annotate(
            f"{row.file}\n{type_label(row.info)}",
            (row.info.bpw, y),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    if use_kld:
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("mean KL-divergence vs base" if use_kld else "perplexity")
    ax.set_title(f"{'KLD' if use_kld else 'PPL'} vs size on {Path(source).name}", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    with atomic_write(out, ".tmp.png") as tmp:  # matplotlib reads the format from the name
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def resolve_text(text_file: Path | None, dataset: str | None) -> tuple[bytes, str]:
    if text_file is not None and dataset is not None:
        raise PerplexityError("-f and --dataset: give one text, not both")
    if dataset is not None:
        if dataset not in DATASETS:
            raise PerplexityError(
                f"--dataset {dataset}: unknown; available: {', '.join(DATASETS)} (or -f FILE)"
            )
        text_file = DATASETS[dataset]
    return load_text(text_file), str(text_file or DEFAULT_TEXT)


def run_cli(
    models: Sequence[Path],
    text_file: Path | None,
    config: PerplexityConfig,
    as_json: bool,
    base: Path | None = None,
    vs_q4_0: bool = False,
    plot: Path | None = None,
    dataset: str | None = None,
) -> None:
    text, source = resolve_text(text_file, dataset)
    native.check_gpu_layers(config.n_gpu_layers)
    if vs_q4_0 and base is None:
        raise PerplexityError("--vs-q4_0: needs --base BASE.gguf (the F32/F16/BF16 file to quantize)")
    for path in (*models, *([base] if base else [])):  # every file checked before minutes are spent
        check_model_file(path, config.n_ctx)
    if base is None:
        rows = _plain_rows(models, text, source, config, as_json)
    else:
        entries = [(p, "model") for p in models]
        if vs_q4_0:
            entries.append((q4_0_baseline(base, config.n_threads), "llama.cpp Q4_0"))
        with _progress(as_json) as bar:  # one pass: a bar with each model's running KLD
            task = bar.add_task(f"{len(entries)} model(s) vs {base.name}", total=None, info="")
            rows = against_base(base, entries, text, source, config, _kld_updater(bar, task))
    if plot is not None:
        write_plot(rows, plot, source)
    if as_json:
        base_ppl = rows[0].ppl.ppl if base else None
        doc = {
            "text": source,
            "n_ctx": config.n_ctx,
            "base": str(base) if base else None,
            "rows": [r.as_dict(base_ppl) for r in sorted(rows, key=lambda r: r.info.size_mib)],
        }
        print(json.dumps(doc, indent=2))
        return
    _render(rows, source, base is not None)
