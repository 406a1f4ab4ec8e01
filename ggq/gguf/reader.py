"""A fast, validating reader of a GGUF file's key/values and tensor table.

gguf-py's GGUFReader builds a numpy view per array element, which takes half a minute on a
151,936-token vocabulary; this reads the same section in well under a second. It checks
everything llama.cpp's loader checks before it touches tensor data (lengths against the bytes
left, duplicate keys and names, the alignment, shapes, ggml types, the data layout), so a damaged
file is refused here with one line naming it, not by an abort inside llama.cpp.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ggq import ggml
from ggq.errors import GGQError
from ggq.gguf.constants import DTYPE, GGUF_MAGIC, ValueType

GGML_MAX_NAME = 64  # ggml's limit on a tensor name, terminating NUL included
GGML_MAX_DIMS = 4
INT64_MAX = 2**63 - 1
_KV_MIN_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
_TENSOR_MIN_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset


class GGUFFormatError(GGQError, ValueError):
    """The file is not a well-formed GGUF; the message names the file and what is wrong."""


class ModelFileError(GGQError, ValueError):
    """A GGUF that cannot serve as a model: unreadable, or without (or shorter than) the context asked for."""


class _Cursor:
    def __init__(self, f: BinaryIO, path: Path, size: int) -> None:
        self.f, self.path, self.size = f, path, size
        self.where = "the header"  # what is being read, for a truncation message

    def left(self) -> int:
        return self.size - self.f.tell()

    def fail(self, what: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.path}: {what}")

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise self.fail(f"truncated at byte {self.f.tell()} of {self.size}, in {self.where}")
        return data

    def u32(self) -> int:
        return int(struct.unpack("<I", self.read(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.read(8))[0])

    def string(self, what: str, index: int | None = None) -> str:
        at, n = self.f.tell(), self.u64()
        if n > self.left():
            label = what if index is None else f"{what}[{index}]"  # built only on failure
            raise self.fail(
                f"{label} at byte {at}: length {n} exceeds the {self.left()} bytes left in the file"
            )
        return self.read(n).decode("utf-8", errors="surrogateescape")


def _value(cur: _Cursor, key: str, vtype: int) -> Any:
    if vtype == ValueType.STRING:
        return cur.string(f"value of {key}")
    if vtype == ValueType.ARRAY:
        itype, count = cur.u32(), cur.u64()
        if itype == ValueType.STRING:
            if count * 8 > cur.left():  # each string is at least its 8-byte length
                raise cur.fail(
                    f"{key}: array of {count} strings exceeds the {cur.left()} bytes left in the file"
                )
            return [cur.string(key, i) for i in range(count)]
        if itype not in DTYPE:
            raise cur.fail(f"{key}: unsupported array item type {itype}")
        dtype = DTYPE[ValueType(itype)]
        if count * dtype.itemsize > cur.left():
            raise cur.fail(f"{key}: array of {count} items exceeds the {cur.left()} bytes left in the file")
        arr = np.frombuffer(cur.read(count * dtype.itemsize), dtype=dtype)
        return arr.astype(bool) if itype == ValueType.BOOL else arr
    if vtype in DTYPE:
        dtype = DTYPE[ValueType(vtype)]
        scalar = np.frombuffer(cur.read(dtype.itemsize), dtype=dtype)[0].item()
        return bool(scalar) if vtype == ValueType.BOOL else scalar
    raise cur.fail(f"{key}: unknown metadata value type {vtype}")


@dataclass(frozen=True)
class TensorRecord:
    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] (row length) first
    type_id: int
    offset: int  # absolute, in bytes from the start of the file
    nbytes: int


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, TensorRecord]

    def tensor_data(self, name: str) -> np.ndarray:
        """The raw bytes of one tensor as a read-only uint8 memory map."""
        t = self.tensors[name]
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.nbytes,))

    def tensor_f32(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        if t.type_id != 0:
            raise GGUFFormatError(f"{self.path}: tensor {name} has ggml type {t.type_id}, expected F32 (0)")
        return np.frombuffer(self.tensor_data(name), dtype="<f4").reshape(tuple(reversed(t.shape)))


@dataclass(frozen=True)
class _Info:
    name: str
    shape: tuple[int, ...]
    type_id: int
    rel: int  # offset from the start of the data section
    nbytes: int


def _tensor_nbytes(path: Path, name: str, type_id: int, shape: tuple[int, ...]) -> int:
    try:
        t = ggml.type_by_id(type_id)
    except ggml.QuantError as exc:
        raise GGUFFormatError(f"{path}: tensor {name} has unknown ggml type {type_id}") from exc
    if shape and shape[0] % t.block_size:
        raise GGUFFormatError(
            f"{path}: tensor {name} row length {shape[0]} is not a multiple of {t.block_size}"
        )
    return t.nbytes(shape)


def _read_kv(cur: _Cursor) -> dict[str, Any]:
    version = cur.u32()
    if version not in (2, 3):
        raise cur.fail(f"unsupported GGUF version {version}")
    n_tensors, n_kv = cur.u64(), cur.u64()
    if n_tensors * _TENSOR_MIN_BYTES > cur.left() or n_kv * _KV_MIN_BYTES > cur.left():
        raise cur.fail(
            f"header claims {n_tensors} tensors and {n_kv} keys, more than the file's {cur.size} bytes hold"
        )
    meta: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors}
    for i in range(n_kv):
        cur.where = f"key/value {i} of {n_kv}"
        key = cur.string(f"key {i}")
        if not key:
            raise cur.fail(f"key {i} is empty")
        if key in meta:
            raise cur.fail(f"duplicate key {key!r}")
        cur.where = f"the value of {key} (key/value {i} of {n_kv})"
        vtype = cur.u32()
        meta[key] = _value(cur, key, vtype)
        if key == "general.alignment":
            align = meta[key]
            if vtype != ValueType.UINT32 or align <= 0 or align & (align - 1):
                raise cur.fail(
                    f"general.alignment = {align!r} (GGUF type {vtype}): expected a uint32 power of 2"
                )
    return meta


def _read_info(cur: _Cursor, seen: set[str]) -> _Info:
    cur.where = f"tensor info {len(seen)}"
    name = cur.string(f"name of tensor {len(seen)}")
    if len(name.encode("utf-8", errors="surrogateescape")) >= GGML_MAX_NAME:
        raise cur.fail(f"tensor name {name[:80]!r} is longer than ggml's {GGML_MAX_NAME - 1} bytes")
    if name in seen:
        raise cur.fail(f"duplicate tensor name {name!r}")
    seen.add(name)
    n_dims = cur.u32()
    if n_dims > GGML_MAX_DIMS:
        raise cur.fail(f"tensor {name} has {n_dims} dimensions (at most {GGML_MAX_DIMS})")
    shape = tuple(cur.u64() for _ in range(n_dims))
    if any(d > INT64_MAX for d in shape) or math.prod(shape) > INT64_MAX:
        raise cur.fail(f"tensor {name} has shape {shape}: more elements than an int64 counts")
    type_id, rel = cur.u32(), cur.u64()
    return _Info(name, shape, type_id, rel, _tensor_nbytes(cur.path, name, type_id, shape))


def _check_layout(path: Path, infos: list[_Info], data_start: int, alignment: int, size: int) -> None:
    """Every tensor inside the file, and llama.cpp's rule: each starts where the previous one's
    padded bytes end (so none overlaps another)."""
    expected = 0
    for i, t in enumerate(infos):
        end = data_start + t.rel + t.nbytes
        if end > size:
            raise GGUFFormatError(
                f"{path}: tensor {t.name} ({t.nbytes} bytes at data offset {t.rel}) ends at byte {end}, "
                f"beyond the file size {size} (truncated?)"
            )
        if t.rel != expected:
            hit = next((u for u in infos[:i] if u.rel < t.rel + t.nbytes and t.rel < u.rel + u.nbytes), None)
            if hit is not None:
                raise GGUFFormatError(
                    f"{path}: tensor {t.name} (data offsets {t.rel}..{t.rel + t.nbytes}) overlaps tensor "
                    f"{hit.name} ({hit.rel}..{hit.rel + hit.nbytes})"
                )
            raise GGUFFormatError(f"{path}: tensor {t.name} at data offset {t.rel}, expected {expected}")
        expected = t.rel + -(-t.nbytes // alignment) * alignment


def _read(path: Path) -> GGUFFile:
    size = path.stat().st_size
    with path.open("rb") as f:
        cur = _Cursor(f, path, size)
        if f.read(4) != GGUF_MAGIC:
            raise GGUFFormatError(f"{path}: not a GGUF file (no 'GGUF' magic)")
        meta = _read_kv(cur)
        seen: set[str] = set()
        infos = [_read_info(cur, seen) for _ in range(meta["GGUF.tensor_count"])]
        alignment = int(meta.get("general.alignment", 32))
        data_start = -(-f.tell() // alignment) * alignment
    _check_layout(path, infos, data_start, alignment, size)
    tensors = {t.name: TensorRecord(t.name, t.shape, t.type_id, data_start + t.rel, t.nbytes) for t in infos}
    return GGUFFile(path, meta, tensors)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """All key/value pairs of a GGUF file (``GGUF.version`` and ``GGUF.tensor_count`` added), after
    the whole file's structure was validated as in ``read_gguf``."""
    return _read(Path(path)).metadata


def read_gguf(path: str | Path) -> GGUFFile:
    """Metadata and tensor table of a GGUF file, validated against the file size."""
    return _read(Path(path))


def check_model_file(path: Path, n_ctx: int) -> None:
    """Validate the GGUF (header, tensor table, data size) before llama.cpp reads it, and n_ctx
    against the model's training context."""
    try:
        meta = read_gguf(path).metadata
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    arch = meta.get("general.architecture")
    n_ctx_train = meta.get(f"{arch}.context_length")
    if not isinstance(n_ctx_train, int):
        raise ModelFileError(f"{path}: no {arch}.context_length in the GGUF metadata")
    if n_ctx > n_ctx_train:
        raise ModelFileError(
            f"{path}: -c {n_ctx} exceeds the model's training context ({arch}.context_length = {n_ctx_train})"
        )
