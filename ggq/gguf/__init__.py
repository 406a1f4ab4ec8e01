"""GGUF files: reading metadata now; the writer and tensor-type recipes follow with `convert`."""

from ggq.gguf.reader import GGUFFormatError, read_metadata

__all__ = ["GGUFFormatError", "read_metadata"]
