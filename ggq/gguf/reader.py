"""A fast reader of a GGUF file's key/value metadata.

gguf-py's GGUFReader builds a numpy view per array element, which takes half a minute on a
151,936-token vocabulary; this reads the same section in well under a second.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

GGUF_MAGIC = b"GGUF"

# GGUF value type id -> numpy dtype (little-endian), for scalars and numeric arrays
_NUMERIC: dict[int, np.dtype[Any]] = {
    0: np.dtype("<u1"),
    1: np.dtype("<i1"),
    2: np.dtype("<u2"),
    3: np.dtype("<i2"),
    4: np.dtype("<u4"),
    5: np.dtype("<i4"),
    6: np.dtype("<f4"),
    7: np.dtype("<u1"),  # bool
    10: np.dtype("<u8"),
    11: np.dtype("<i8"),
    12: np.dtype("<f8"),
}
_STRING, _ARRAY, _BOOL = 8, 9, 7


class GGUFFormatError(ValueError):
    """The file is not a well-formed GGUF; the message names the file and what is wrong."""


class _Cursor:
    def __init__(self, f: BinaryIO, path: Path, size: int) -> None:
        self.f, self.path, self.size = f, path, size

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise GGUFFormatError(f"{self.path}: truncated at byte {self.f.tell()} of {self.size}")
        return data

    def u32(self) -> int:
        return int(struct.unpack("<I", self.read(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.read(8))[0])

    def string(self) -> str:
        n = self.u64()
        if n > self.size:
            raise GGUFFormatError(f"{self.path}: string length {n} exceeds the file size {self.size}")
        return self.read(n).decode("utf-8", errors="surrogateescape")


def _value(cur: _Cursor, vtype: int) -> Any:
    if vtype == _STRING:
        return cur.string()
    if vtype == _ARRAY:
        itype, count = cur.u32(), cur.u64()
        if itype == _STRING:
            return [cur.string() for _ in range(count)]
        if itype not in _NUMERIC:
            raise GGUFFormatError(f"{cur.path}: unsupported array item type {itype}")
        dtype = _NUMERIC[itype]
        if count * dtype.itemsize > cur.size:
            raise GGUFFormatError(f"{cur.path}: array of {count} items exceeds the file size")
        arr = np.frombuffer(cur.read(count * dtype.itemsize), dtype=dtype)
        return arr.astype(bool) if itype == _BOOL else arr
    if vtype in _NUMERIC:
        dtype = _NUMERIC[vtype]
        scalar = np.frombuffer(cur.read(dtype.itemsize), dtype=dtype)[0].item()
        return bool(scalar) if vtype == _BOOL else scalar
    raise GGUFFormatError(f"{cur.path}: unknown metadata value type {vtype}")


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


def _tensor_nbytes(path: Path, name: str, type_id: int, shape: tuple[int, ...]) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError) as exc:
        raise GGUFFormatError(f"{path}: tensor {name} has unknown ggml type {type_id}") from exc
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if shape and shape[0] % block:
        raise GGUFFormatError(f"{path}: tensor {name} row length {shape[0]} is not a multiple of {block}")
    return n // block * size


def _read(path: Path, with_tensors: bool) -> GGUFFile:
    size = path.stat().st_size
    with path.open("rb") as f:
        cur = _Cursor(f, path, size)
        if f.read(4) != GGUF_MAGIC:
            raise GGUFFormatError(f"{path}: not a GGUF file (no 'GGUF' magic)")
        version = cur.u32()
        if version not in (2, 3):
            raise GGUFFormatError(f"{path}: unsupported GGUF version {version}")
        n_tensors, n_kv = cur.u64(), cur.u64()
        if n_tensors > size or n_kv > size:
            raise GGUFFormatError(f"{path}: header claims {n_tensors} tensors and {n_kv} keys; corrupted")
        meta: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = _value(cur, cur.u32())
        tensors: dict[str, TensorRecord] = {}
        if not with_tensors:
            return GGUFFile(path, meta, tensors)
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.u32()
            if n_dims > 4:
                raise GGUFFormatError(f"{path}: tensor {name} has {n_dims} dimensions")
            shape = tuple(cur.u64() for _ in range(n_dims))
            infos.append((name, shape, cur.u32(), cur.u64()))
        alignment = int(meta.get("general.alignment", 32))
        data_start = -(-f.tell() // alignment) * alignment
    for name, shape, type_id, rel in infos:
        nbytes = _tensor_nbytes(path, name, type_id, shape)
        if data_start + rel + nbytes > size:
            raise GGUFFormatError(
                f"{path}: tensor {name} ends at byte {data_start + rel + nbytes} beyond the file size {size} (truncated?)"
            )
        tensors[name] = TensorRecord(name, shape, type_id, data_start + rel, nbytes)
    return GGUFFile(path, meta, tensors)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """All key/value pairs of a GGUF file (``GGUF.version`` and ``GGUF.tensor_count`` added)."""
    return _read(Path(path), with_tensors=False).metadata


def read_gguf(path: str | Path) -> GGUFFile:
    """Metadata and tensor table of a GGUF file, validated against the file size."""
    return _read(Path(path), with_tensors=True)
