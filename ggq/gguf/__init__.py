"""GGUF files: a fast reader, a streaming atomic writer and the metadata (the tensor-type recipes
are in ggq.plan)."""

from ggq.gguf.reader import (
    GGUFFile,
    GGUFFormatError,
    ModelFileError,
    TensorRecord,
    check_model_file,
    read_gguf,
    read_metadata,
)

__all__ = [
    "GGUFFile",
    "GGUFFormatError",
    "ModelFileError",
    "TensorRecord",
    "check_model_file",
    "read_gguf",
    "read_metadata",
]
