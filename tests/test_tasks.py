"""Zero-shot scores (ggq.tasks) against two references on the same GGUF and the same task files
(written here from the shipped held-out text): the tasks scored here from llama-cpp-python's
log-probabilities by llama.cpp's definitions (mean log-probability of an ending's tokens, highest
wins), from the tasks as written rather than the file ggq reads; and llama-perplexity's own
printed lines, read here (from a run made here, for HellaSwag from the log of ggq's run). A wrong
parser, a wrong task-file writer (save_multiple_choice) or a subset of the tasks fails."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ggq import native, tasks
from ggq.eval import llama_tools

# (context, gold index, endings), (question, answers, index of the correct one),
# (sentence with _, choice 1, choice 2, answer 1|2)
HellaSwag = tuple[str, int, list[str]]
Choice = tuple[str, list[str], int]
Winogrande = tuple[str, str, str, int]
N_HELLASWAG = 401  # one past llama-perplexity's default of 400 (random) HellaSwag tasks
N_CTX = 256  # the tool allocates logits for 4 x n_ctx tokens


def shipped_sentences(heldout: Path) -> list[list[str]]:
    """Sentences of the held-out book text (past its Gutenberg header) as plain words."""
    text = " ".join(heldout.read_text()[16_000:].split())
    words = [re.findall(r"[A-Za-z]+", s) for s in re.split(r"(?<=[.!?])\s+", text)]
    return [w for w in words if 14 <= len(w) <= 30]


def spans(sentences: list[list[str]], j: int, start: int, n: int, count: int) -> list[str]:
    """Words ``start:start+n`` of sentence ``j`` (the truth) and of the next sentences, ``count``
    different ones in all."""
    out: list[str] = []
    for words in sentences[j:]:
        span = " ".join(words[start : start + n])
        if span not in out:
            out.append(span)
        if len(out) == count:
            return out
    raise ValueError(f"test data: not {count} different spans after sentence {j}")


def hellaswag_tasks(sentences: list[list[str]]) -> list[HellaSwag]:
    """Context: a sentence's first 6 words; endings: its next 1-4 words and as many words of
    following sentences; the gold position turns from task to task."""
    out = []
    for i in range(N_HELLASWAG):
        j = i % 50
        spans_j = spans(sentences, j, 6, 1 + j % 4, 4)  # spans_j[0] is the truth
        gold = (i // 50 + j) % 4
        endings = spans_j[1:]
        endings.insert(gold, spans_j[0])
        out.append((" ".join(sentences[j][:6]), gold, endings))
    return out


def choice_tasks(sentences: list[list[str]]) -> list[Choice]:
    """Question: 8 words; answers: the next 2 words and 2-4 other sentences' (5 answers once)."""
    out = []
    for j in range(60, 72):
        n_answers = 5 if j == 61 else 3 + j % 2
        answers = spans(sentences, j, 8, 2, n_answers)
        correct = j % n_answers
        answers[0], answers[correct] = answers[correct], answers[0]
        out.append((" ".join(sentences[j][:8]), answers, correct))
    return out


def winogrande_tasks(sentences: list[list[str]]) -> list[Winogrande]:
    """A sentence with its 5th word blanked; choices: that word and the 5th of another sentence."""
    out = []
    for j in range(80, 96):
        w, other = sentences[j], sentences[j + 20][4]
        answer = 1 + j % 2
        choices = (w[4], other) if answer == 1 else (other, w[4])
        out.append((" ".join([*w[:4], "_", *w[5:]]), *choices, answer))
    return out


class Reference:
    """Per-token log-probabilities from llama-cpp-python (llama.cpp's library, not its tool)."""

    def __init__(self, gguf: Path) -> None:
        llama_cpp = native.import_llama_cpp()
        # one thread: ggml's thread sync spins badly on a loaded 2-core machine
        self.llm = llama_cpp.Llama(
            model_path=str(gguf), n_ctx=N_CTX, logits_all=True, n_threads=1, n_threads_batch=1, verbose=False
        )
        self.cache: dict[tuple[int, ...], np.ndarray] = {}

    def tokens(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode(), add_bos=True, special=False))

    def logprobs(self, tokens: Sequence[int]) -> np.ndarray:
        """(len - 1,) log p(token j+1 | tokens 0..j), in float64."""
        key = tuple(tokens)
        if key not in self.cache:
            self.llm.reset()
            self.llm.eval(list(tokens))
            logits = np.asarray(self.llm.scores[: len(tokens)], dtype=np.float64)  # (n, vocab)
            logits -= logits.max(axis=1, keepdims=True)
            lsm = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            self.cache[key] = lsm[np.arange(len(tokens) - 1), list(tokens[1:])]
        return self.cache[key]

    def ending_scores(self, texts: list[str]) -> list[float]:
        """llama.cpp's multiple-choice score of each text: the mean log-probability of its tokens
        after the prefix all texts share."""
        seqs = [self.tokens(t) for t in texts]
        prefix = 0
        while prefix < min(map(len, seqs)) and len({s[prefix] for s in seqs}) == 1:
            prefix += 1
        return [float(self.logprobs(s)[prefix - 1 :].mean()) for s in seqs]

    def winogrande_scores(self, first: str, choices: tuple[str, str], second: str) -> list[float]:
        """llama.cpp's Winogrande score of each choice: the mean log-probability of the sentence's
        tokens after the choice, without the last one."""
        seqs = [self.tokens(first + c + second) for c in choices]
        prefix = 0
        while prefix < min(map(len, seqs)) and seqs[0][prefix] == seqs[1][prefix]:
            prefix += 1
        if min(len(s) - prefix for s in seqs) <= 3:  # llama.cpp then scores differently
            raise ValueError(f"test data: too little after the choice in {first}_{second}")
        out = []
        for s, c in zip(seqs, choices, strict=True):
            base = len(self.tokens(first + c))
            last = 1 if len(s) - base > 1 else 0
            out.append(float(self.logprobs(s)[base - 1 : len(s) - 1 - last].mean()))
        return out


@dataclass(frozen=True)
class Picks:
    """Per task: the index the reference picks, the gold index, and the winning margin."""

    picked: list[int]
    gold: list[int]
    margins: list[float]

    def accuracy(self) -> float:
        return 100.0 * sum(p == g for p, g in zip(self.picked, self.gold, strict=True)) / len(self.gold)


def picks(scores: list[list[float]], gold: list[int]) -> Picks:
    picked = [int(np.argmax(s)) for s in scores]  # the first maximum, as llama.cpp's strict >
    margins = [float(np.sort(s)[-1] - np.sort(s)[-2]) for s in scores]
    return Picks(picked, gold, margins)


def run_tool(gguf: Path, task_file: Path, *flag: str) -> str:
    cmd = [str(native.tool_path("llama-perplexity")), "-m", str(gguf), "-f", str(task_file), *flag]
    done = subprocess.run(
        [*cmd, "-t", "1", "-c", str(N_CTX), "-b", str(N_CTX)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def tool_line(log: str, n: int) -> list[str]:
    """The tool's line for its n-th task, split at tabs."""
    lines = [line.split("\t") for line in log.splitlines() if line.startswith(f"{n}\t")]
    assert lines, f"no line for task {n} in the llama-perplexity log:\n{log[-2000:]}"
    return lines[-1]


@pytest.fixture(scope="module")
def micro_gguf(qwen3_micro: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_convert import to_gguf

    return to_gguf(qwen3_micro, tmp_path_factory.mktemp("tasks") / "micro-F32.gguf", "F32")


@pytest.fixture(scope="module")
def reference(micro_gguf: Path) -> Reference:
    return Reference(micro_gguf)


@pytest.fixture(scope="module")
def sentences(heldout: Path) -> list[list[str]]:
    return shipped_sentences(heldout)


def check_reference(p: Picks, shifted: Picks) -> None:
    """The data can tell right from wrong: no near ties, a score strictly between 0 and 100, and
    a gold index read one off gives another score."""
    assert min(p.margins) > 1e-4, "test data: a near tie the two routes could break differently"
    assert 0 < p.accuracy() < 100
    assert shifted.accuracy() != p.accuracy()


def spy_logs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The logs of the llama-perplexity runs ggq.tasks makes, as the tool printed them."""
    logs: list[str] = []

    def run_for(cmd: list[str], parse: Callable[[str], Any]) -> tuple[Any, str]:
        found, log = llama_tools.run_for(cmd, parse)
        logs.append(log)
        return found, log

    monkeypatch.setattr(tasks, "run_for", run_for)
    return logs


def test_hellaswag_equals_independent_scoring(
    micro_gguf: Path,
    reference: Reference,
    sentences: list[list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hs = hellaswag_tasks(sentences)
    path = tmp_path / "hellaswag-shipped.txt"
    path.write_text("".join(f"{ctx}\n{gold}\n" + "".join(f"{e}\n" for e in ends) for ctx, gold, ends in hs))
    scores = [reference.ending_scores([f"{ctx} {e}" for e in ends]) for ctx, _, ends in hs]
    ref = picks(scores, [g for _, g, _ in hs])
    check_reference(ref, picks(scores, [(g + 1) % 4 for _, g, _ in hs]))

    logs = spy_logs(monkeypatch)
    ours = tasks.score(micro_gguf, "hellaswag", path, threads=1, n_ctx=N_CTX)
    assert f"{ours:.8f}" == f"{ref.accuracy():.8f}"  # the tool prints 8 decimals
    # the tool's own line after its last task, read here from the log of ggq's run (a second run
    # of 401 tasks would double the test's time): all 401 taken, not its default random 400
    assert float(tool_line(logs[-1], N_HELLASWAG)[1].rstrip("%")) == ours


def test_multiple_choice_equals_independent_scoring(
    micro_gguf: Path, reference: Reference, sentences: list[list[str]], tmp_path: Path
) -> None:
    mc = choice_tasks(sentences)
    path = tmp_path / "mc-shipped.bin"
    tasks.save_multiple_choice(path, mc)  # the writer under test
    assert tasks.multiple_choice_answers(path) == [len(a) for _, a, _ in mc]
    scores = [reference.ending_scores([f"{q} {a}" for a in answers]) for q, answers, _ in mc]
    ref = picks(scores, [c for _, _, c in mc])
    check_reference(ref, picks(scores, [(c + 1) % len(a) for _, a, c in mc]))

    ours = tasks.score(micro_gguf, "multiple-choice", path, threads=1, n_ctx=N_CTX)
    assert f"{ours:.8f}" == f"{ref.accuracy():.8f}"
    # one task has 5 answers: the tool needs -np 5 (ggq passes it)
    log = run_tool(micro_gguf, path, "--multiple-choice", "-np", "5")  # -np 4: task 2 fails
    final = re.search(r"Final result: ([0-9.]+) \+/- ", log)
    assert final is not None, log[-2000:]
    assert final.group(1) == f"{ours:.4f}"
    assert float(tool_line(log, len(mc))[1]) == ours


def test_winogrande_equals_independent_scoring(
    micro_gguf: Path, reference: Reference, sentences: list[list[str]], tmp_path: Path
) -> None:
    wg = winogrande_tasks(sentences)
    path = tmp_path / "winogrande-shipped.csv"
    path.write_text("".join(f"{i},{s},{c1},{c2},{a}\n" for i, (s, c1, c2, a) in enumerate(wg)))
    scores = []
    for sentence, c1, c2, _ in wg:
        first, second = sentence.split("_")
        scores.append(reference.winogrande_scores(first, (c1, c2), second))
    # llama.cpp picks choice 1 only when its score is strictly higher
    picked = [0 if s[0] > s[1] else 1 for s in scores]
    gold = [a - 1 for *_, a in wg]
    ref = Picks(picked, gold, [abs(s[0] - s[1]) for s in scores])
    check_reference(ref, Picks(picked, [1 - g for g in gold], ref.margins))

    ours = tasks.score(micro_gguf, "winogrande", path, threads=1, n_ctx=N_CTX)
    assert f"{ours:.4f}" == f"{ref.accuracy():.4f}"  # the tool prints 4 decimals
    # run as is, the tool loses the file's last task (-f drops the last newline, its CSV reader
    # then the last line): ggq gives it a copy ending in an empty line, as here
    assert f"loaded {len(wg) - 1} tasks" in run_tool(micro_gguf, path, "--winogrande")
    padded = tmp_path / "padded.csv"
    padded.write_text(path.read_text() + "\n")
    log = run_tool(micro_gguf, padded, "--winogrande")
    assert float(tool_line(log, len(wg))[1]) == ours
    # and its per-task lines agree with the reference's picks, task by task
    rows = [r.split("\t") for r in log.splitlines() if re.match(r"^\d+\t[0-9.]+\t", r)]
    assert [int(r[2].split()[2]) - 1 for r in rows] == picked


def test_a_log_short_of_the_last_task_gives_no_score() -> None:
    """A log that lost its last lines must not give the accuracy over fewer tasks."""
    log = "hellaswag_score : selecting 3 randomized tasks.\n"
    log += "".join(f"{i}\t{v}%\t[1.0%, 99.0%]\n" for i, v in ((1, "100.00000000"), (2, "50.00000000")))
    assert tasks.parse_score("hellaswag", log) is None
    assert tasks.parse_score("hellaswag", log + "3\t33.33333333%\t[1.0%, 90.0%]\n") == 33.33333333


def test_run_tasks_caches_by_content(micro_gguf: Path, sentences: list[list[str]], tmp_path: Path) -> None:
    folder = tmp_path / "tasks"
    folder.mkdir()
    tasks.save_multiple_choice(folder / "mc.bin", choice_tasks(sentences)[:4])
    logged: list[str] = []
    kw: dict[str, Any] = {"threads": 1, "log": logged.append, "n_ctx": N_CTX}
    first = tasks.run_tasks(micro_gguf, folder, tmp_path / "cache", **kw)
    assert tasks.run_tasks(micro_gguf, folder, tmp_path / "cache", **kw) == first and len(logged) == 1
    tasks.save_multiple_choice(folder / "mc.bin", choice_tasks(sentences)[4:8])  # same name, new tasks
    tasks.run_tasks(micro_gguf, folder, tmp_path / "cache", **kw)
    assert len(logged) == 2
