"""`ggq chat`: talk to a GGUF through llama-cpp-python on ggq's own llama.cpp build.

The prompt is the chat template embedded in the GGUF (``tokenizer.chat_template``), rendered with
jinja2 the way Hugging Face renders it, with Qwen3's ``enable_thinking`` switch; tokens stream as
llama.cpp samples them and a reply ends at the model's end-of-generation token (``<|im_end|>``).
Qwen3's soft switches work as the model card describes: a user turn containing ``/think`` or
``/no_think`` turns thinking on or off from that turn on. Sampling defaults are Qwen3's
recommended ones for the current mode unless given explicitly.
"""

from __future__ import annotations

import functools
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ggq import signals
from ggq.errors import GGQError
from ggq.gguf import GGUFFormatError, read_metadata

# Qwen3 model card: thinking mode 0.6 / 0.95 / 20 / 0, non-thinking 0.7 / 0.8 / 20 / 0
RECOMMENDED = {
    True: {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0},
    False: {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0},
}
# used when a GGUF carries no template: ChatML, what Qwen models speak
CHATML = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)
END_OF_TURN = ("<|im_end|>", "<|endoftext|>")


class ChatError(GGQError, ValueError):
    """A model or option chat cannot use; names the file or option."""


@dataclass
class Sampling:
    temperature: float | None = None  # None: Qwen3's recommendation for the current mode
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int = 2048
    seed: int = -1  # -1: random
    ignore_eos: bool = False  # as llama-cli's --ignore-eos: never sample an end-of-generation token

    def resolve(self, think: bool) -> dict[str, Any]:
        rec = RECOMMENDED[think]
        out = {k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in rec.items()}
        return {**out, "max_tokens": self.max_tokens}


def soft_switch(text: str) -> bool | None:
    """Qwen3's soft switch in a user turn: True for /think, False for /no_think, else None (the last wins)."""
    think, no_think = text.rfind("/think"), text.rfind("/no_think")
    if think < 0 and no_think < 0:
        return None
    return think > no_think


def _render(template: str, **context: Any) -> str:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(**context)


@dataclass
class ChatSession:
    """One conversation with one model: history, thinking mode, sampling."""

    path: Path
    n_ctx: int = 4096
    n_gpu_layers: int = -1
    n_threads: int = 0
    system: str | None = None
    think: bool = True
    sampling: Sampling = field(default_factory=Sampling)
    messages: list[dict[str, str]] = field(default_factory=list)
    finish_reason: str | None = None  # why the last reply ended: "stop" (end of turn) or "length"
    reply_tokens: list[int] = field(default_factory=list)  # the last reply's tokens

    def __post_init__(self) -> None:
        from ggq import native

        try:
            meta = read_metadata(self.path)
        except (GGUFFormatError, OSError) as exc:
            raise ChatError(f"{self.path}: cannot read as GGUF ({exc})") from exc
        try:
            native.check_gpu_layers(self.n_gpu_layers)
        except native.DeviceError as exc:
            raise ChatError(str(exc)) from exc
        self.template = str(meta.get("tokenizer.chat_template") or CHATML)
        self.has_template = "tokenizer.chat_template" in meta
        self.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
        llama_cpp = native.import_llama_cpp()
        kwargs: dict[str, Any] = {"n_ctx": self.n_ctx, "n_gpu_layers": self.n_gpu_layers, "verbose": False}
        if self.n_threads:
            kwargs["n_threads"] = self.n_threads
        if self.sampling.seed >= 0:
            kwargs["seed"] = self.sampling.seed
        try:
            self.llm = llama_cpp.Llama(model_path=str(self.path), **kwargs)
        except ValueError as exc:
            raise ChatError(f"{self.path}: llama.cpp could not load it ({exc})") from exc
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt(self) -> str:
        return _render(
            self.template,
            messages=self.messages,
            add_generation_prompt=True,
            enable_thinking=self.think,
            bos_token="",
            eos_token="<|im_end|>",
        )

    def stream(self, user: str) -> Iterator[str]:
        """The reply to ``user``, piece by piece; history is updated as it streams."""
        switch = soft_switch(user)
        if switch is not None:
            self.think = switch
        self.messages.append({"role": "user", "content": user})
        tokens = self.llm.tokenize(self.prompt().encode(), add_bos=self.add_bos, special=True)
        if len(tokens) >= self.n_ctx:
            self.messages.pop()
            raise ChatError(
                f"the conversation ({len(tokens)} tokens) no longer fits -c {self.n_ctx}; /clear it"
            )
        reply = {"role": "assistant", "content": ""}
        self.messages.append(reply)
        for piece in self._generate(tokens, self.sampling.resolve(self.think)):
            reply["content"] += piece
            yield piece

    def _generate(self, prompt: list[int], params: dict[str, Any]) -> Iterator[str]:
        """Sample from ``prompt`` and yield the text as it completes; ends on an end-of-generation
        token or an end-of-turn string (finish "stop") or after max_tokens ("length").
        llama-cpp-python's streaming create_completion re-detokenizes the whole reply after every
        token (quadratic: 35 s for 400 tokens of Qwen3's vocabulary) and can overrun max_tokens
        on split UTF-8; here each token is detokenized once (ReplyText)."""
        import numpy as np

        from ggq import native

        llama_cpp = native.import_llama_cpp()
        llm = self.llm
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        seed = self.sampling.seed
        llm.set_seed(seed if seed >= 0 else random.Random().randint(0, 2**32))
        banned = np.fromiter(self._end_tokens, dtype=np.int64) if self.sampling.ignore_eos else None

        def ban_end_tokens(_ids: Any, scores: Any) -> Any:
            scores[banned] = -np.inf
            return scores

        limit = min(params["max_tokens"], self.n_ctx - len(prompt))
        text = ReplyText()
        self.finish_reason, self.reply_tokens = "length", []
        generator = llm.generate(
            prompt,
            top_k=params["top_k"],
            top_p=params["top_p"],
            min_p=params["min_p"],
            temp=params["temperature"],
            logits_processor=[ban_end_tokens] if banned is not None else None,
        )
        for token in generator:
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                self.finish_reason = "stop"
                break
            self.reply_tokens.append(token)
            if piece := text.feed(llm.detokenize([token])):
                yield piece
            if text.stopped:
                self.finish_reason = "stop"
                break
            if len(self.reply_tokens) >= limit:
                break
        generator.close()
        if piece := text.flush():
            yield piece

    @functools.cached_property
    def _end_tokens(self) -> set[int]:
        """Every token llama.cpp ends a generation on (EOS, <|im_end|>, <|endoftext|>, FIM tokens, ...)."""
        from ggq import native

        llama_cpp = native.import_llama_cpp()
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        return {t for t in range(self.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)}


class ReplyText:
    """A reply's bytes, token by token, in; the text that is safe to show out. An incremental
    UTF-8 decoder holds back a character split across tokens (invalid bytes are dropped, as
    llama-cpp-python does); a tail that may begin an end-of-turn string is held back until it
    cannot, and the text stops before one (``stopped``)."""

    def __init__(self, stops: tuple[str, ...] = END_OF_TURN) -> None:
        import codecs

        self.stops = stops
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self.pending = ""
        self.stopped = False

    def feed(self, data: bytes) -> str:
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(data)
        at = min((i for i in (self.pending.find(e) for e in self.stops) if i >= 0), default=-1)
        if at >= 0:
            self.stopped = True
            out, self.pending = self.pending[:at], ""
            return out
        keep = max(
            (k for e in self.stops for k in range(1, len(e)) if self.pending.endswith(e[:k])), default=0
        )
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        """What is held back, at the end of the reply."""
        if self.stopped:
            return ""
        out, self.pending = self.pending + self.decoder.decode(b"", final=True), ""
        return out


class ThinkPrinter:
    """Writes a streamed reply; the <think> block dimmed on a terminal (or to ``thoughts``)."""

    def __init__(self, out: TextIO, thoughts: TextIO | None = None) -> None:
        self.out, self.thoughts = out, thoughts
        self.in_think = False
        self.pending = ""

    def _emit(self, text: str) -> None:
        if not text:
            return
        if self.in_think:
            if self.thoughts is not None:
                dim = self.thoughts.isatty()
                self.thoughts.write(f"\x1b[2m{text}\x1b[0m" if dim else text)
                self.thoughts.flush()
            return
        self.out.write(text)
        self.out.flush()

    def write(self, piece: str) -> None:
        self.pending += piece
        while self.pending:
            tag = "</think>" if self.in_think else "<think>"
            at = self.pending.find(tag)
            if at >= 0:
                self._emit(self.pending[:at])
                self.pending = self.pending[at + len(tag) :]
                self.in_think = not self.in_think
                if not self.in_think:
                    self.pending = self.pending.lstrip("\n")
                continue
            keep = next((k for k in range(len(tag) - 1, 0, -1) if self.pending.endswith(tag[:k])), 0)
            self._emit(self.pending[: len(self.pending) - keep])
            self.pending = self.pending[len(self.pending) - keep :]
            break

    def close(self) -> None:
        self._emit(self.pending)
        self.pending = ""


HELP = "/think /no_think: switch thinking · /clear: forget the conversation · /exit or Ctrl-D: quit"


def one_shot(session: ChatSession, prompt: str, out: TextIO | None = None, err: TextIO | None = None) -> None:
    """-p: the answer on stdout, the thinking (if any) on stderr."""
    out = out or sys.stdout
    printer = ThinkPrinter(out, err or sys.stderr)
    for piece in session.stream(prompt):
        printer.write(piece)
    printer.close()
    out.write("\n")


def repl(session: ChatSession, read: Callable[[str], str] = input, out: TextIO | None = None) -> None:
    """The interactive loop: Ctrl-C stops a reply, Ctrl-D (or Ctrl-C at the prompt) quits."""
    out = out or sys.stdout
    template = (
        "the GGUF's chat template" if session.has_template else "ChatML (the GGUF has no chat template)"
    )
    out.write(
        f"ggq chat: {session.path.name}, {template}, thinking {'on' if session.think else 'off'}\n{HELP}\n"
    )
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return
        if text == "/clear":
            session.reset()
            out.write("(conversation cleared)\n")
            continue
        if text in ("/think", "/no_think"):
            session.think = text == "/think"
            out.write(f"(thinking {'on' if session.think else 'off'})\n")
            continue
        if text in ("/help", "/?"):
            out.write(HELP + "\n")
            continue
        printer = ThinkPrinter(out, out)
        before = signals.interrupts()
        try:
            for piece in session.stream(text):
                if signals.interrupts() != before:  # a Ctrl-C whose KeyboardInterrupt was lost
                    raise KeyboardInterrupt
                printer.write(piece)
            printer.close()
        except KeyboardInterrupt:
            printer.close()
            out.write(" [stopped]")
        except ChatError as exc:
            out.write(f"error: {exc}")
        out.write("\n")
