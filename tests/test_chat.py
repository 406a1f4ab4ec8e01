"""`ggq chat`: driven as a person drives it (a real pseudo-terminal), and one-shot as scripts use it."""

from __future__ import annotations

import contextlib
import io
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from ggq import chat
from ggq.cli import main
from tests.test_convert import to_gguf


@pytest.fixture(scope="module")
def model(checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tied fixture: Qwen3's tokenizer and a ChatML template with the thinking switch."""
    return to_gguf(checkpoint("tied"), tmp_path_factory.mktemp("chat") / "tied-Q8_0.gguf", "Q8_0")


class Terminal:
    """A child process on a pseudo-terminal, read and written like a user at a keyboard."""

    def __init__(self, args: list[str]) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(
            args,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            cwd=Path(__file__).parent.parent,
        )
        os.close(slave)
        self.seen = b""

    def expect(self, text: bytes, timeout: float = 120) -> bytes:
        """Everything up to and including ``text``; fails with what was seen on timeout."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {text!r}; saw {self.seen[-2000:]!r}"
            ready, _, _ = select.select([self.master], [], [], min(left, 1.0))
            if ready:
                try:
                    self.seen += os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    assert text in self.seen, f"exited before {text!r}; saw {self.seen[-2000:]!r}"
        at = self.seen.index(text) + len(text)
        out, self.seen = self.seen[:at], self.seen[at:]
        return out

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=60)
        finally:
            os.close(self.master)


def chat_terminal(model: Path, *args: str) -> Terminal:
    return Terminal([sys.executable, "-m", "ggq.cli", "chat", str(model), "--seed", "0", "-c", "512", *args])


def test_prompt_streams_a_reply_and_ctrl_d_exits(model: Path) -> None:
    term = chat_terminal(model, "-n", "12", "--no-think")
    banner = term.expect(b"> ")
    assert b"tied-Q8_0.gguf" in banner and b"thinking off" in banner
    term.send(b"Tell me a story\r")
    reply = term.expect(b"> ")  # the reply, then the next prompt
    text = reply.decode(errors="replace").split("Tell me a story", 1)[-1].strip(" \r\n>")
    assert len(text) > 0 and "<|im_end|>" not in text, reply
    term.send(b"\x04")  # Ctrl-D
    assert term.close() == 0


def test_ctrl_c_stops_a_reply_and_keeps_the_session(model: Path) -> None:
    term = chat_terminal(
        model, "-n", "100000", "--no-think", "--ignore-eos", "-c", "4096"
    )  # runs ~4,000 tokens
    term.expect(b"> ")
    term.send(b"Go on and on\r")
    term.expect(b"Go on and on\r\n")  # the echo; then wait for the reply to start streaming
    deadline = time.monotonic() + 60
    while len(term.seen) < 40 and time.monotonic() < deadline:
        ready, _, _ = select.select([term.master], [], [], 0.1)
        if ready:
            term.seen += os.read(term.master, 4096)
    os.killpg(term.proc.pid, signal.SIGINT)  # what the terminal sends on Ctrl-C
    term.expect(b"[stopped]")
    term.expect(b"> ")
    term.send(b"/exit\r")
    assert term.close() == 0


def test_slash_commands_switch_thinking_and_clear(model: Path) -> None:
    term = chat_terminal(model, "-n", "4")
    assert b"thinking on" in term.expect(b"> ")
    term.send(b"/no_think\r")
    assert b"(thinking off)" in term.expect(b"> ")
    term.send(b"/clear\r")
    assert b"(conversation cleared)" in term.expect(b"> ")
    term.send(b"\x04")
    assert term.close() == 0


def test_one_shot_is_deterministic_with_a_seed(model: Path) -> None:
    args = ["chat", str(model), "-p", "Hello", "-n", "16", "--seed", "7", "--no-think", "-c", "512"]
    first, second = CliRunner().invoke(main, args), CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout and first.stdout.strip()


def test_template_and_soft_switches(model: Path) -> None:
    session = chat.ChatSession(
        model, n_ctx=512, system="Be brief.", think=True, sampling=chat.Sampling(max_tokens=8, seed=0)
    )
    session.messages.append({"role": "user", "content": "Hi"})
    with_thinking = session.prompt()
    assert with_thinking.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert with_thinking.endswith("<|im_start|>assistant\n")
    session.think = False
    assert session.prompt().endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    session.reset()
    session.think = True
    reply = "".join(session.stream("Answer quickly /no_think"))
    assert session.think is False and session.messages[-1] == {"role": "assistant", "content": reply}
    assert chat.soft_switch("a /no_think b /think") is True and chat.soft_switch("plain") is None
    assert (
        chat.Sampling().resolve(False)["top_p"] == 0.8
        and chat.Sampling(top_p=0.5).resolve(True)["top_p"] == 0.5
    )


def test_ignore_eos_runs_to_max_tokens(model: Path) -> None:
    """--ignore-eos: no end-of-generation token can be sampled, so only -n ends the reply. Seed 1
    is one whose reply, without it, ends on an end-of-generation token (checked first)."""
    sampling = chat.Sampling(max_tokens=480, seed=1)
    session = chat.ChatSession(model, n_ctx=512, think=False, sampling=sampling)
    "".join(session.stream("Hello"))
    assert session.finish_reason == "stop"
    sampling.ignore_eos = True
    session.reset()
    assert "".join(session.stream("Hello")) and session.finish_reason == "length"
    assert len(session.reply_tokens) == 480  # exactly -n, even where tokens split a character
    assert len(session._end_tokens) >= 2


def test_a_long_reply_detokenizes_each_token_once(model: Path) -> None:
    """llama-cpp-python's streaming create_completion re-detokenizes the whole reply after every
    token (400 tokens of this vocabulary took 35 s through it, 73,832 detokenize calls): the
    work per token must not grow with the reply."""
    session = chat.ChatSession(
        model, n_ctx=1024, think=False, sampling=chat.Sampling(max_tokens=600, seed=3, ignore_eos=True)
    )
    calls: list[int] = []
    detokenize = session.llm.detokenize

    def counted(tokens: list[int], *args: Any, **kwargs: Any) -> bytes:
        calls.append(len(tokens))
        return detokenize(tokens, *args, **kwargs)

    session.llm.detokenize = counted  # type: ignore[method-assign]
    assert "".join(session.stream("Hello"))
    assert len(session.reply_tokens) == 600 and calls == [1] * 600


def test_reply_text_holds_back_split_characters_and_end_of_turn() -> None:
    text = chat.ReplyText()
    assert text.feed(b"caf\xc3") == "caf" and text.feed(b"\xa9 ") == "\u00e9 "  # é in two tokens
    assert text.feed(b"done<|im") == "done" and text.feed(b"_") == ""  # maybe an end of turn
    assert text.feed(b"end|>more") == "" and text.stopped and text.flush() == ""
    other = chat.ReplyText()
    assert other.feed(b"a <|i") == "a " and other.feed(b"s it?") == "<|is it?"  # not one after all
    assert other.feed(b"\xff ok") == " ok"  # invalid bytes are dropped
    assert other.feed(b"<") == "" and other.flush() == "<" and not other.stopped


def test_think_block_goes_to_its_own_stream_even_when_tags_are_split() -> None:
    out, thoughts = io.StringIO(), io.StringIO()
    printer = chat.ThinkPrinter(out, thoughts)
    for piece in ["<thi", "nk>\nlet me ", "see</th", "ink>\n\nThe answer", " is 4."]:
        printer.write(piece)
    printer.close()
    assert out.getvalue() == "The answer is 4." and thoughts.getvalue() == "\nlet me see"


def test_bad_model_and_gpu_are_one_line(model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    result = CliRunner().invoke(main, ["chat", str(bad), "-p", "x"])
    assert result.exit_code == 2 and "bad.gguf: cannot read as GGUF" in result.output
    from ggq import native

    if not any(d["type"] in ("gpu", "igpu") for d in native.load().devices()):
        result = CliRunner().invoke(main, ["chat", str(model), "-p", "x", "--gpu-layers", "5"])
        assert result.exit_code == 2 and "--gpu-layers 5: no GPU available" in result.output


def test_a_ctrl_c_whose_exception_was_lost_still_stops_the_reply() -> None:
    """Chat's SIGINT handler raises KeyboardInterrupt in the main thread, which is lost when the
    signal lands in a ctypes callback (llama.cpp's log/progress callbacks: ctypes prints and
    drops it; a CI run saw a reply stream on for 120 s after Ctrl-C). The handler also counts the
    interrupt, so the REPL stops the reply at its next piece all the same and keeps the session."""
    from ggq.signals import SignalGuard

    guard = SignalGuard()
    guard.interactive_sigint = True
    pieces: list[int] = []

    class Session:
        path, has_template, think = Path("m.gguf"), True, False

        def stream(self, text: str) -> Any:
            for i in range(1000):
                if i == 3:
                    with contextlib.suppress(KeyboardInterrupt):  # as a ctypes callback drops it
                        guard._raise(signal.SIGINT, None)
                pieces.append(i)
                yield f"w{i} "

    lines = iter(["go on", "/exit"])
    out = io.StringIO()
    chat.repl(Session(), read=lambda _: next(lines), out=out)  # type: ignore[arg-type]
    assert "w0 w1 w2  [stopped]\n" in out.getvalue() and "w3" not in out.getvalue()
    assert pieces == [0, 1, 2, 3]  # the reply ended at the piece after the lost interrupt
