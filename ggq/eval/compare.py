"""Files scored against a base: the rows that ``ggq ppl --base`` shows and ``ggq study`` stores.

The base and every model are loaded together and evaluated chunk by chunk in one pass
(``perplexity.run_against_base``); each row carries the file's facts, its perplexity and, for a
model, its KL-divergence from the base. Nothing here prints: the caller shows progress through
``update``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ggq.eval.fileinfo import FileInfo, file_info
from ggq.eval.kld import KldStats
from ggq.eval.perplexity import PerplexityConfig, PerplexityResult, prepare, run_against_base

# (chunks done, chunks in all, per model (running PPL, running mean KLD))
Update = Callable[[int, int, list[tuple[float, float]]], None]


def result_dict(r: PerplexityResult) -> dict[str, Any]:
    return {**asdict(r), "tokens_per_second": r.tokens_per_second}


@dataclass(frozen=True)
class Row:
    """One line of the table: a file, what it is, and how it scored."""

    file: str
    role: str  # "base", "llama.cpp Q4_0" (the --vs-q4_0 baseline) or "model"
    info: FileInfo
    ppl: PerplexityResult
    kld: KldStats | None

    def as_dict(self, base_ppl: float | None) -> dict[str, Any]:
        d: dict[str, Any] = {"file": self.file, "role": self.role, **asdict(self.info)}
        d.update(result_dict(self.ppl))
        if base_ppl is not None:
            d["delta_ppl"] = self.ppl.ppl - base_ppl
            d["delta_ppl_pct"] = 100 * (self.ppl.ppl / base_ppl - 1)
        d["kld"] = asdict(self.kld) if self.kld is not None else None
        return d


def against_base(
    base: Path,
    models: Sequence[tuple[Path, str]],
    text: bytes,
    source: str,
    config: PerplexityConfig,
    update: Update | None = None,
) -> list[Row]:
    """The base's row, then one row per (model, role), in the order given, from one pass."""
    base_run = prepare(base, text, config, source)
    runs = [prepare(p, text, config, source) for p, _ in models]
    base_result, compared = run_against_base(base_run, runs, update)
    rows = [Row(base.name, "base", file_info(base), base_result, None)]
    for (path, role), c in zip(models, compared, strict=True):
        name = f"{base.stem}-Q4_0.gguf" if role == "llama.cpp Q4_0" else path.name
        rows.append(Row(name, role, file_info(path), c.result, c.kld))
    return rows
