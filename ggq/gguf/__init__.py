"""GGUF files: a fast reader, a streaming atomic writer, metadata, and tensor-type recipes."""

from ggq.gguf.reader import GGUFFile, GGUFFormatError, TensorRecord, read_gguf, read_metadata

__all__ = ["GGUFFile", "GGUFFormatError", "TensorRecord", "read_gguf", "read_metadata"]
