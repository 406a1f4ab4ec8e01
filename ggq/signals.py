"""SIGINT and SIGTERM during a command: the ``with`` blocks of the writers unwind (their temporary
files go), the shell's exit status (130, 143) and one line; a watchdog does the same when the
main thread sits in a long native call and does not unwind in time."""

from __future__ import annotations

import os
import select
import signal
import socket
import threading
import time
from types import FrameType, TracebackType
from typing import Any

from ggq.files import TEMPORARIES

# exit status and the one line printed, as a shell reports a process killed by the signal
SIGNAL_EXITS = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated")}
GRACE_S = 3.0  # after a signal, how long the command may take to unwind before the watchdog exits
_INTERRUPTS = [0]  # interactive SIGINTs so far (chat's Ctrl-C), see interrupts()


def interrupts() -> int:
    """How many interactive Ctrl-Cs (SignalGuard.interactive_sigint) this process has had. A
    loop that must stop on one compares it with its value before: the KeyboardInterrupt the
    handler raises is lost when it lands in a ctypes callback (llama.cpp's log or progress
    callbacks: ctypes prints and drops exceptions raised there), the count is not."""
    return _INTERRUPTS[0]


class Terminated(BaseException):
    """SIGTERM raised in the main thread, as KeyboardInterrupt is for SIGINT: the ``with`` blocks of
    the writers unwind and remove their temporary files. A BaseException, so ``except Exception``
    in library code cannot swallow it."""


class SignalGuard:
    """For the duration of a command, SIGINT and SIGTERM raise in the main thread (KeyboardInterrupt,
    Terminated), even where the shell started ggq with SIGINT ignored (a background job of a
    script, where Python installs no handler). The C-level handler also writes the signal number
    to a socket (``set_wakeup_fd``), which wakes a watchdog thread even while the main thread sits
    in a long native call (a llama.cpp decode or quantization, a torch op): when the command has
    not unwound ``GRACE_S`` later, or on a second signal, the watchdog removes the temporary files
    itself, prints the same line and exits with the same status."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.interactive_sigint = False  # chat's REPL: every Ctrl-C stops a reply, none ends ggq
        self._old: dict[int, Any] = {}
        self._done = threading.Event()
        self._exit_lock = threading.Lock()
        self._installed = False

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is not threading.main_thread():
            return self  # handlers can be set in the main thread only
        self._r, self._w = socket.socketpair()
        self._w.setblocking(False)
        for s in SIGNAL_EXITS:
            self._old[s] = signal.signal(s, self._raise)
        self._old_fd = signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="ggq-signal-watchdog", daemon=True)
        self._thread.start()
        self._installed = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._installed:
            return
        with self._exit_lock:  # blocks while the watchdog is exiting the process
            self._done.set()
        signal.set_wakeup_fd(self._old_fd)
        for s, old in self._old.items():
            signal.signal(s, old)
        self._w.close()  # wakes the watchdog, which sees _done
        self._thread.join(1.0)
        self._r.close()

    def _raise(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.interactive_sigint:
            _INTERRUPTS[0] += 1
            raise KeyboardInterrupt
        if self.signum is not None:
            return  # already unwinding; a second signal makes the watchdog exit at once
        self.signum = signum
        raise KeyboardInterrupt if signum == signal.SIGINT else Terminated

    def _watch(self) -> None:
        first: int | None = None
        deadline = 0.0
        while True:
            timeout = None if first is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._r], [], [], timeout)
            if self._done.is_set():
                return
            if not ready:
                break  # the grace time is over
            data = self._r.recv(64)
            if not data:
                return
            for b in data:
                if b not in SIGNAL_EXITS or (b == signal.SIGINT and self.interactive_sigint):
                    continue
                if first is not None:
                    self._exit(first)  # a second signal: no more waiting
                first, deadline = b, time.monotonic() + GRACE_S
        if first is not None:
            self._exit(first)

    def _exit(self, signum: int) -> None:
        with self._exit_lock:
            if self._done.is_set():
                return
            TEMPORARIES.remove_all()
            code, word = SIGNAL_EXITS[signal.Signals(signum)]
            os.write(2, f"{word}\n".encode())
            os._exit(code)
