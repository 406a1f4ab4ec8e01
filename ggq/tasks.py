"""Zero-shot tasks through llama.cpp's own multiple-choice scoring (``llama-perplexity``).

The task files are the ones llama.cpp's tool reads; the user supplies them in one folder:

    hellaswag*.txt     6 lines per task: context, gold index (0-3), four endings (--hellaswag)
    winogrande*.csv    index,sentence with _,choice1,choice2,answer (1|2) (--winogrande)
    *.bin              llama.cpp's binary multiple-choice format: ARC, MMLU, PIQA, BoolQ, TruthfulQA
                       ... (--multiple-choice), named by file stem

Every task of a file is scored (llama-perplexity alone would score a random 400 of a HellaSwag
file), and a score is only read from a log that shows the file's last task. Each (model, task file)
score is cached as JSON, keyed by the file's content, the context size and the llama.cpp commit.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

from ggq import native
from ggq.errors import GGQError
from ggq.eval.llama_tools import run_for
from ggq.files import atomic_write, cache_key, sha256_file

KINDS = (
    ("hellaswag", "hellaswag*.txt", ["--hellaswag"]),
    ("winogrande", "winogrande*.csv", ["--winogrande"]),
    ("multiple-choice", "*.bin", ["--multiple-choice"]),
)
HELLASWAG_LINE = re.compile(r"^(\d+)\t([0-9.]+)%\t\[", re.M)
# the running accuracy after each task (the tool prints its "Final" line only from 100 tasks on)
WINOGRANDE_LINE = re.compile(r"^(\d+)\t([0-9.]+)\t\s*-?[0-9.]+\s+-?[0-9.]+\s+\d\s+\d$", re.M)
MULTIPLE_CHOICE_LINE = re.compile(r"^(\d+)\t([0-9.]+)$", re.M)
# how many tasks the tool took from the file (it prints a running accuracy line per task)
TASK_COUNT = {
    "hellaswag": re.compile(r"hellaswag_score : selecting (\d+) "),
    "winogrande": re.compile(r"winogrande_score : (?:loaded|selecting) (\d+) "),
    "multiple-choice": re.compile(r"multiple_choice_score: (?:there are|selecting) (\d+) "),
}
ERROR_LINE = re.compile(r"^[0-9.]+ E (.+)$", re.M)  # llama.cpp's log: "0.00.198.656 E message"
MC_MIN_PARALLEL = 4  # llama-perplexity's sequences for a multiple-choice run: one per answer


class TaskError(GGQError, ValueError):
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
    """The running accuracy (%) llama-perplexity printed after the last task it took, or None when
    the log does not reach that task (a log that lost its last lines would otherwise give the
    accuracy over fewer tasks)."""
    pattern = {"hellaswag": HELLASWAG_LINE, "winogrande": WINOGRANDE_LINE}.get(kind, MULTIPLE_CHOICE_LINE)
    n = tasks_taken(kind, log)
    final = [acc for i, acc in pattern.findall(log) if int(i) == n]
    return float(final[-1]) if final else None


def tasks_taken(kind: str, log: str) -> int | None:
    """How many tasks llama-perplexity said it scores (the last of "loaded" and "selecting")."""
    counts = TASK_COUNT[kind].findall(log)
    return int(counts[-1]) if counts else None


def multiple_choice_answers(path: Path) -> list[int]:
    """The number of scored answers of every task of a multiple-choice .bin (the layout
    ``save_multiple_choice`` writes); TaskError naming the file and task where it is not that."""
    data = path.read_bytes()

    def u32(pos: int, what: str) -> int:
        if pos + 4 > len(data):
            raise TaskError(f"{path}: {what}: the file ends at byte {len(data)}")
        return int(struct.unpack_from("<I", data, pos)[0])

    n_task = u32(0, "task count")
    if n_task == 0:
        raise TaskError(f"{path}: no tasks")
    answers = []
    for i in range(n_task):
        pos = u32(4 + 4 * i, f"offset of task {i}")
        pos += 4 + u32(pos, f"task {i}: question")
        for answer_set in ("mc1", "mc2"):  # the tool scores mc1; it reads mc2 all the same
            n = u32(pos, f"task {i}: {answer_set}")
            if n > 100 or (n == 0 and answer_set == "mc1"):
                raise TaskError(f"{path}: task {i}: {n} answers in {answer_set} (1-100 expected)")
            if answer_set == "mc1":
                answers.append(n)
            pos += 4
            for a in range(n):
                pos += 4 + u32(pos, f"task {i}: {answer_set} answer {a}")
            pos += 4 * n  # int32 labels
            if pos > len(data):
                raise TaskError(f"{path}: task {i}: {answer_set} runs past the end of the file")
    return answers


def task_count(kind: str, path: Path) -> int:
    """Tasks in a file: HellaSwag 6 lines each, Winogrande one per non-empty line, multiple
    choice the count in its header."""
    if kind == "multiple-choice":
        return len(multiple_choice_answers(path))
    lines = path.read_text(errors="replace").splitlines()
    return len(lines) // 6 if kind == "hellaswag" else sum(1 for line in lines if line.strip())


def score(model: Path, kind: str, task_file: Path, threads: int = 0, n_ctx: int = 2048) -> float:
    """llama-perplexity's accuracy (%) of ``model`` on every task of one task file; TaskError when
    the tool took fewer tasks than the file has (a malformed line it skipped, names its complaint)."""
    flag = next(f for k, _, f in KINDS if k == kind)
    threads = threads or len(os.sched_getaffinity(0))
    expected = task_count(kind, task_file)
    with tempfile.TemporaryDirectory(prefix="ggq-tasks-") as tmp:
        cmd = [str(native.tool_path("llama-perplexity")), "-m", str(model), *flag]
        cmd += ["-t", str(threads), "-c", str(n_ctx), "-b", str(n_ctx)]
        if kind == "hellaswag":
            cmd += ["-f", str(task_file), "--hellaswag-tasks", str(expected)]  # its default: a random 400
        elif kind == "winogrande":
            # -f drops the text's last newline and the tool's CSV reader then the last line: a
            # copy ending in an empty line keeps every task
            copy = Path(tmp) / task_file.name
            copy.write_text(task_file.read_text(errors="replace").rstrip("\n") + "\n\n")
            cmd += ["-f", str(copy)]
        else:  # -bf: the bytes as they are; one sequence per answer, more than 4 answers need more
            n_parallel = max(MC_MIN_PARALLEL, *multiple_choice_answers(task_file))
            cmd += ["-bf", str(task_file), "-np", str(n_parallel)]
        found, log = run_for(cmd, lambda text: parse_score(kind, text))
    if found is None:
        tail = [line for line in log.splitlines() if line.strip()][-2:]
        raise TaskError(
            f"{task_file}: llama-perplexity {flag[0]} gave no score for {model.name}: {' / '.join(tail)}"
        )
    taken = tasks_taken(kind, log)
    if taken != expected:
        complaint = ERROR_LINE.search(log)  # the first line the tool skipped, as it says it
        raise TaskError(
            f"{task_file}: llama-perplexity {flag[0]} took {taken} of its {expected} tasks"
            + (f" ({complaint.group(1).strip()})" if complaint else "")
        )
    return found


def run_tasks(
    model: Path,
    folder: Path,
    cache: Path,
    threads: int = 0,
    log: Callable[[str], None] = print,
    key: str = "",
    n_ctx: int = 2048,
) -> dict[str, float]:
    """Task name -> accuracy (%) of ``model`` on every task file in ``folder``, cached in ``cache``
    by the model's name (the study's names carry their files' keys), the task file's content,
    ``n_ctx``, the llama.cpp commit and ``key`` (what else the caller's score depends on)."""
    scores = {}
    commit = str(native.load().LLAMA_CPP_COMMIT)
    for name, kind, path in find_tasks(folder):
        digest = cache_key(sha256_file(path), kind, n_ctx, commit, key)
        cached = cache / f"{model.stem}-task-{name}-{digest}.json"
        if cached.exists():
            scores[name] = float(json.loads(cached.read_text())["accuracy"])
            continue
        log(f"llama-perplexity --{kind} {path.name} on {model.name}")
        scores[name] = score(model, kind, path, threads, n_ctx)
        with atomic_write(cached) as tmp:
            tmp.write_text(
                json.dumps({"model": model.name, "task": name, "file": path.name, "accuracy": scores[name]})
            )
    return scores


def save_multiple_choice(path: Path, tasks: list[tuple[str, list[str], int]]) -> None:
    """Write (question, answers, index of the correct answer) tasks in llama.cpp's binary
    multiple-choice format (what ``llama-perplexity --multiple-choice`` reads): task count,
    each task's byte offset, then per task the question and two answer sets (the tool scores the
    first; labels 1 mark correct answers) as length-prefixed strings and int32 labels."""

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
