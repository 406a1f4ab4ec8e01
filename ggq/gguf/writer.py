"""A streaming, atomic GGUF v3 writer.

Order is enforced: key/values and tensor infos first, then ``begin_data()``, then each tensor's
bytes in the order its info was added, then ``finish()``. Everything goes to a temporary file
beside the target and is renamed over it only when complete, so a failed or interrupted write
never leaves a half-written file under the final name. While it writes, the writer holds an
exclusive lock (``flock``) on ``.NAME.lock`` beside the target: a second process writing the same
file fails at once, naming the first one's pid, instead of both spending the work. The lock dies
with its process, so a killed writer leaves no stale lock.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np

from ggq.errors import GGQError
from ggq.files import TEMPORARIES, Pending
from ggq.gguf.constants import DTYPE, GGUF_MAGIC, STRUCT_FORMAT, ValueType

GGUF_VERSION = 3
ALIGNMENT = 32


class WriterError(GGQError, RuntimeError):
    """Misuse of the writer: a call out of order, or data that does not match its tensor info."""


class OutputError(WriterError):
    """The output cannot be written (missing or read-only folder, disk full, another writer):
    one line naming the file, the folder or the other process."""


def check_output_path(path: Path) -> None:
    """Fail now, before any work, where ``path`` cannot be created: its folder missing or not a
    folder, or no file can be made there (permissions, a read-only file system). A probe file is
    created and removed, since permission bits say nothing for root and nothing of the mount."""
    if path.is_dir():
        raise OutputError(f"{path}: is a folder, expected a file name")
    parent = path.parent
    if not parent.exists():
        raise OutputError(f"{path}: folder {parent} does not exist")
    if not parent.is_dir():
        raise OutputError(f"{path}: {parent} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create files in {parent} ({exc.strerror or exc})") from exc
    os.close(fd)
    os.unlink(probe)


def _lock_holder(fd: int) -> str:
    raw = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    return f"pid {raw}" if raw.isdigit() else "pid unknown"


def _acquire_lock(target: Path) -> tuple[Path, int]:
    """An exclusive flock on ``.NAME.lock`` beside ``target``, the holder's pid written in it."""
    lock = target.with_name(f".{target.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise OutputError(f"{target}: is being written by another process ({holder})") from None
        except BaseException:
            os.close(fd)
            raise
        # the previous holder unlinks the lock file on release: locking that old inode is no lock
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return lock, fd
        os.close(fd)


class _State(enum.Enum):
    META = "adding key/values and tensor infos"
    DATA = "writing tensor data"
    DONE = "finished"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] (row length) first
    type_id: int
    nbytes: int
    offset: int


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _encode_value(value: Any, vtype: ValueType, item_type: ValueType | None) -> bytes:
    if vtype == ValueType.STRING:
        return _string(value)
    if vtype == ValueType.ARRAY:
        if item_type is None:
            raise WriterError("an array value needs its item type")
        head = struct.pack("<IQ", item_type, len(value))
        if item_type == ValueType.STRING:
            return head + b"".join(_string(s) for s in value)
        if item_type == ValueType.BOOL:
            return head + np.asarray(value, dtype=bool).astype("<u1").tobytes()
        return head + np.asarray(value).astype(DTYPE[item_type]).tobytes()
    return struct.pack(STRUCT_FORMAT[vtype], value)


def _infer(value: Any) -> tuple[ValueType, ValueType | None]:
    if isinstance(value, bool):
        return ValueType.BOOL, None
    if isinstance(value, int):
        return ValueType.UINT32 if 0 <= value < 2**32 else ValueType.INT64, None
    if isinstance(value, float):
        return ValueType.FLOAT32, None
    if isinstance(value, str):
        return ValueType.STRING, None
    if isinstance(value, np.ndarray):
        kinds = {"f": ValueType.FLOAT32, "i": ValueType.INT32, "u": ValueType.UINT32, "b": ValueType.BOOL}
        return ValueType.ARRAY, kinds[value.dtype.kind]
    if isinstance(value, Sequence):
        if all(isinstance(v, str) for v in value):
            return ValueType.ARRAY, ValueType.STRING
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return ValueType.ARRAY, ValueType.INT32
        if all(isinstance(v, float | int) for v in value):
            return ValueType.ARRAY, ValueType.FLOAT32
    raise WriterError(f"cannot infer a GGUF type for {type(value).__name__} value")


class GGUFWriter:
    """Write one GGUF file: ``add_kv`` / ``add_tensor_info``, ``begin_data``, ``write_tensor``, ``finish``."""

    def __init__(self, path: str | Path, alignment: int = ALIGNMENT) -> None:
        self.path = Path(path)
        self.alignment = alignment
        self._kv: list[bytes] = []
        self._keys: set[str] = set()
        self._tensors: list[TensorInfo] = []
        self._next_offset = 0
        self._next_tensor = 0
        self._state = _State.META
        self._tmp: Pending | None = None
        self._f: BinaryIO | None = None
        self._lock: tuple[Path, int] | None = None
        self._deferred: dict[str, int] = {}  # defer_tensor: name -> its data's position
        if alignment != ALIGNMENT:
            self.add_kv("general.alignment", alignment, ValueType.UINT32)

    def _expect(self, state: _State, action: str) -> None:
        if self._state != state:
            raise WriterError(
                f"{self.path}: cannot {action} while {self._state.value}; expected {state.value}"
            )

    def add_kv(
        self, key: str, value: Any, vtype: ValueType | None = None, item_type: ValueType | None = None
    ) -> None:
        self._expect(_State.META, f"add key {key!r}")
        if key in self._keys:
            raise WriterError(f"{self.path}: duplicate key {key!r}")
        if vtype is None:
            vtype, item_type = _infer(value)
        self._keys.add(key)
        self._kv.append(_string(key) + struct.pack("<I", vtype) + _encode_value(value, vtype, item_type))

    def add_tensor_info(self, name: str, shape: Sequence[int], type_id: int, nbytes: int) -> None:
        self._expect(_State.META, f"add tensor {name!r}")
        if any(t.name == name for t in self._tensors):
            raise WriterError(f"{self.path}: duplicate tensor {name!r}")
        self._tensors.append(
            TensorInfo(name, tuple(int(d) for d in shape), type_id, nbytes, self._next_offset)
        )
        self._next_offset += -(-nbytes // self.alignment) * self.alignment

    def file_size(self) -> int:
        """The size the finished file will have with the key/values and tensor infos added so far:
        what ``begin_data`` writes (header, key/values, tensor infos, padded to the alignment) and
        every tensor's data, each padded to the alignment."""
        infos = sum(len(_string(t.name)) + 4 + 8 * len(t.shape) + 12 for t in self._tensors)
        head = len(GGUF_MAGIC) + struct.calcsize("<IQQ") + sum(map(len, self._kv)) + infos
        return -(-head // self.alignment) * self.alignment + self._next_offset

    def _pad(self, f: BinaryIO) -> None:
        f.write(b"\0" * (-f.tell() % self.alignment))

    @contextmanager
    def _os_errors(self, doing: str) -> Iterator[None]:
        """An OSError of the file system (ENOSPC, EACCES, EROFS, EFBIG, ...) becomes one line
        naming the target; the temporary file and the lock are removed."""
        try:
            yield
        except OSError as exc:
            self.abort()
            reason = exc.strerror or str(exc)
            name = errno.errorcode.get(exc.errno) if exc.errno is not None else None
            code = f", {name}" if name else ""
            raise OutputError(
                f"{self.path}: cannot {doing} ({reason}{code}); nothing written under that name"
            ) from exc

    def begin_data(self) -> None:
        """Write header, key/values and tensor infos to a temporary file beside the target."""
        self._expect(_State.META, "begin tensor data")
        with self._os_errors("create the file"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = _acquire_lock(self.path)
            TEMPORARIES.add(self._lock[0])
            self._tmp, fd = Pending.create(self.path, ".part")
            self._f = os.fdopen(fd, "wb")
        with self._os_errors("write"):
            f = self._f
            f.write(GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(self._tensors), len(self._kv)))
            f.writelines(self._kv)
            for t in self._tensors:
                f.write(_string(t.name) + struct.pack("<I", len(t.shape)))
                f.write(struct.pack(f"<{len(t.shape)}Q", *t.shape) + struct.pack("<IQ", t.type_id, t.offset))
            self._pad(f)
        self._state = _State.DATA

    def _next_info(self, name: str, action: str) -> TensorInfo:
        """The info of the next tensor in the file's order, which must be ``name``."""
        self._expect(_State.DATA, f"{action} tensor {name!r}")
        if self._next_tensor >= len(self._tensors):
            raise WriterError(f"{self.path}: tensor {name!r} has no info")
        info = self._tensors[self._next_tensor]
        if info.name != name:
            raise WriterError(f"{self.path}: expected data of tensor {info.name!r}, got {name!r}")
        return info

    def write_tensor(self, name: str, data: bytes | np.ndarray | Iterable[bytes | np.ndarray]) -> None:
        """The bytes of the next tensor: all at once, or as an iterable of consecutive chunks."""
        info = self._next_info(name, "write")
        self._write_chunks(info, data)
        assert self._f is not None
        with self._os_errors("write"):
            self._pad(self._f)
        self._next_tensor += 1

    def _write_chunks(
        self, info: TensorInfo, data: bytes | np.ndarray | Iterable[bytes | np.ndarray]
    ) -> None:
        """``data`` (as write_tensor takes it) at the file's position: exactly ``info.nbytes``,
        refused before a chunk would write past them."""
        assert self._f is not None
        chunks = [data] if isinstance(data, bytes | bytearray | np.ndarray) else data
        written = 0
        for chunk in chunks:
            raw = np.ascontiguousarray(chunk).tobytes() if isinstance(chunk, np.ndarray) else bytes(chunk)
            written += len(raw)
            if written > info.nbytes:
                raise WriterError(
                    f"{self.path}: tensor {info.name!r} exceeds the {info.nbytes} bytes its info says"
                )
            with self._os_errors("write"):
                self._f.write(raw)
        if written != info.nbytes:
            raise WriterError(
                f"{self.path}: tensor {info.name!r} is {written} bytes, its info says {info.nbytes}"
            )

    def defer_tensor(self, name: str) -> None:
        """Leave the next tensor's bytes for :meth:`fill_tensor` (the file's order is kept: its
        space is skipped now and written later, before :meth:`finish`)."""
        info = self._next_info(name, "defer")
        assert self._f is not None
        with self._os_errors("write"):
            self._deferred[name] = self._f.tell()
            self._f.seek(info.nbytes, os.SEEK_CUR)
            self._pad(self._f)
        self._next_tensor += 1

    def fill_tensor(self, name: str, data: bytes | np.ndarray | Iterable[bytes | np.ndarray]) -> None:
        """The bytes of a tensor :meth:`defer_tensor` skipped, in the forms write_tensor takes."""
        self._expect(_State.DATA, f"fill tensor {name!r}")
        if name not in self._deferred:
            raise WriterError(f"{self.path}: tensor {name!r} was not deferred")
        info = next(t for t in self._tensors if t.name == name)
        assert self._f is not None
        with self._os_errors("write"):
            end = self._f.seek(0, os.SEEK_END)
            self._f.seek(self._deferred[name])
        self._write_chunks(info, data)
        del self._deferred[name]  # filled: only now (a refused fill leaves it unfilled)
        with self._os_errors("write"):
            self._f.seek(end)

    def finish(self) -> Path:
        """Flush, fsync and rename the temporary file to the target name."""
        self._expect(_State.DATA, "finish")
        if self._next_tensor != len(self._tensors):
            missing = self._tensors[self._next_tensor].name
            raise WriterError(f"{self.path}: finished before writing tensor {missing!r}")
        if self._deferred:
            raise WriterError(f"{self.path}: finished before filling tensor {next(iter(self._deferred))!r}")
        assert self._f is not None and self._tmp is not None
        with self._os_errors("write"):
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.chmod(self._tmp.tmp, 0o644)
            self._tmp.commit()
        self._release_lock()
        self._state = _State.DONE
        return self.path

    def _release_lock(self) -> None:
        if self._lock is not None:
            lock, fd = self._lock
            self._lock = None
            lock.unlink(missing_ok=True)  # while still holding it: see _acquire_lock
            os.close(fd)
            TEMPORARIES.discard(lock)

    def abort(self) -> None:
        """Remove the temporary file and the lock; the target is left as it was."""
        if self._f is not None and not self._f.closed:
            # the buffered tail may not flush (disk full): close() closes the fd all the same
            with suppress(OSError):
                self._f.close()
        if self._tmp is not None:
            self._tmp.discard()
        self._release_lock()

    def __enter__(self) -> GGUFWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._state != _State.DONE:
            self.abort()
