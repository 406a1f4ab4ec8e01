"""Zero-shot tasks through llama.cpp's own multiple-choice scoring (``llama-perplexity``).

The task files are the ones llama.cpp's tool reads; the user supplies them in one folder:

    hellaswag*.txt     6 lines per task: context, gold index (0-3), four endings (--hellaswag)
    winogrande*.csv    index,sentence with _,choice1,choice2,answer (1|2) (--winogrande)
    *.bin              llama.cpp's binary multiple-choice format: ARC, MMLU, PIQA, BoolQ, TruthfulQA
                       ... (--multiple-choice), named by file stem

Each (model, task file) score is cached as JSON by the file's content hash.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from ggq import native
from ggq.eval.llama_tools import run_for
from ggq.hashing import sha256_file

KINDS = (
    ("hellaswag", "hellaswag*.txt", ["--hellaswag"]),
    ("winogrande", "winogrande*.csv", ["--winogrande"]),
    ("multiple-choice", "*.bin", ["--multiple-choice"]),
)
HELLASWAG_LINE = re.compile(r"^(\d+)\t([0-9.]+)%\t\[", re.M)
# the running accuracy after each task (the tool prints its "Final" line only from 100 tasks on)
WINOGRANDE_LINE = re.compile(r"^(\d+)\t([0-9.]+)\t\s*-?[0-9.]+\s+-?[0-9.]+\s+\d\s+\d$", re.M)
MULTIPLE_CHOICE_LINE = re.compile(r"^(\d+)\t([0-9.]+)$", re.M)


class TaskError(ValueError):
    """A task folder or file llama.cpp cannot score; names it."""


def find_tasks(folder: Path) -> list[tuple[str, str, Path]]:
    """(task name, kind, file) for every task file in ``folder``."""
    if not folder.is_dir():
        raise TaskError(f"--tasks {folder}: not a folder")
    found = []
    for kind, pattern, _ in KINDS:
        for path in sorted(folder.glob(pattern)):
            if kind == "hellaswag" and len(path.read_text(errors="replace").splitlines()) % 6:
                raise TaskError(f"{path}: a HellaSwag file has 6 lines per task")
            found.append((path.stem, kind, path))
    if not found:
        raise TaskError(
            f"--tasks {folder}: no task files; expected hellaswag*.txt (6 lines per task), "
            "winogrande*.csv, or llama.cpp multiple-choice .bin files (ARC, MMLU, PIQA, BoolQ, ...)"
        )
    return found


def parse_score(kind: str, log: str) -> float | None:
    """The accuracy in percent llama-perplexity printed last, or None."""
    pattern = {"hellaswag": HELLASWAG_LINE, "winogrande": WINOGRANDE_LINE}.get(kind, MULTIPLE_CHOICE_LINE)
    lines = pattern.findall(log)
    return float(lines[-1][1]) if lines else None


def score(model: Path, kind: str, task_file: Path, threads: int = 0, n_ctx: int = 2048) -> float:
    """llama-perplexity's accuracy (%) of ``model`` on one task file."""
    flag = next(f for k, _, f in KINDS if k == kind)
    threads = threads or len(os.sched_getaffinity(0))
    cmd = [str(native.tool_path("llama-perplexity")), "-m", str(model), "-f", str(task_file), *flag]
    cmd += ["-t", str(threads), "-c", str(n_ctx), "-b", str(n_ctx)]
    found, log = run_for(cmd, lambda text: parse_score(kind, text))
    if found is not None:
        return found
    tail = [line for line in log.splitlines() if line.strip()][-2:]
    raise TaskError(
        f"{task_file}: llama-perplexity {flag[0]} gave no score for {model.name}: {' / '.join(tail)}"
    )


def run_tasks(
    model: Path, folder: Path, cache: Path, threads: int = 0, log: Callable[[str], None] = print
) -> dict[str, float]:
    """Task name -> accuracy (%) of ``model`` on every task file in ``folder``, cached in ``cache``."""
    scores = {}
    for name, kind, path in find_tasks(folder):
        cached = cache / f"{model.stem}-task-{name}-{sha256_file(path)[:12]}.json"
        if cached.exists():
            scores[name] = float(json.loads(cached.read_text())["accuracy"])
            continue
        log(f"llama-perplexity --{kind} {path.name} on {model.name}")
        scores[name] = score(model, kind, path, threads)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.tmp")
        tmp.write_text(
            json.dumps({"model": model.name, "task": name, "file": path.name, "accuracy": scores[name]})
        )
        os.replace(tmp, cached)
    return scores


def save_multiple_choice(path: Path, tasks: list[tuple[str, list[str], int]]) -> None:
    """Write (question, answers, index of the correct answer) tasks in llama.cpp's binary
    multiple-choice format (what ``llama-perplexity --multiple-choice`` reads): task count,
    each task's byte offset, then per task the question and two answer sets (the tool scores the
    first; labels 1 mark correct answers) as length-prefixed strings and int32 labels."""
    import struct

    def string(s: str) -> bytes:
        b = s.encode()
        return struct.pack("<I", len(b)) + b

    bodies = []
    for question, answers, correct in tasks:
        answer_set = struct.pack("<I", len(answers)) + b"".join(string(a) for a in answers)
        answer_set += struct.pack(f"<{len(answers)}i", *[int(i == correct) for i in range(len(answers))])
        bodies.append(string(question) + answer_set + answer_set)
    header = 4 + 4 * len(tasks)
    offsets, pos = [], header
    for body in bodies:
        offsets.append(pos)
        pos += len(body)
    path.write_bytes(struct.pack(f"<I{len(tasks)}I", len(tasks), *offsets) + b"".join(bodies))
