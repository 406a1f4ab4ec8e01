"""Files ggq writes, and the keys of the ones it caches.

Every output is written to a temporary file beside its target and renamed over it only when
complete (``atomic_write``; the GGUF writer through ``Pending``), so a failed or interrupted step
never leaves a half-written file under the final name. While it exists, a temporary file is listed
in ``TEMPORARIES``, which the command line's signal watchdog empties when it cannot wait for the
writers to unwind. Caches (baselines, study results, task scores) are named by content hashes.
Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Temporaries:
    """Temporary files this process is writing now. A signal handler that cannot wait for the
    writers to unwind (the main thread stuck in a long native call) removes them before exiting."""

    def __init__(self) -> None:
        self._paths: set[Path] = set()
        self._lock = threading.Lock()

    def add(self, path: Path) -> None:
        with self._lock:
            self._paths.add(path)

    def discard(self, path: Path) -> None:
        with self._lock:
            self._paths.discard(path)

    def remove_all(self) -> None:
        with self._lock:
            paths, self._paths = self._paths, set()
        for p in paths:
            p.unlink(missing_ok=True)


# process-wide, as signals are: every temporary file (and the GGUF writer's lock) while it exists
TEMPORARIES = Temporaries()


class Pending:
    """``tmp``, a temporary file beside ``target``, listed in TEMPORARIES until :meth:`commit`
    renames it over the target or :meth:`discard` removes it."""

    def __init__(self, target: Path, tmp: Path) -> None:
        self.target = target
        self.tmp = tmp
        TEMPORARIES.add(tmp)

    @classmethod
    def create(cls, target: Path, suffix: str) -> tuple[Pending, int]:
        """A new file ``.NAME.<random><suffix>`` beside ``target`` (no two writers share one) and
        its descriptor, open for writing."""
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
        return cls(target, Path(tmp)), fd

    def commit(self) -> Path:
        os.replace(self.tmp, self.target)
        TEMPORARIES.discard(self.tmp)
        return self.target

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)
        TEMPORARIES.discard(self.tmp)


@contextmanager
def atomic_write(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """The path to write ``path``'s bytes to (by this process or a tool it runs): ``.NAME<suffix>``
    beside it, renamed over ``path`` when the block ends, removed when it raises (a signal
    included). The suffix keeps the extension a writer reads the format from (``.tmp.png``,
    ``.tmp.gguf``), or a pid where processes share a folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pending = Pending(path, path.with_name(f".{path.name}{suffix}"))
    try:
        yield pending.tmp
        pending.commit()
    except BaseException:
        pending.discard()
        raise


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read 4 MiB at a time (GGUFs and checkpoints are large)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def short_hash(text: str, length: int = 12) -> str:
    """The first ``length`` hex digits of the sha256 of ``text``: the key in a cached file's name."""
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def cache_key(*parts: object) -> str:
    """The key of a cached file made from ``parts`` (JSON values: file hashes, names, settings)."""
    return short_hash(json.dumps(list(parts)))
