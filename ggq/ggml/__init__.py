"""ggml tensor types: the type table, byte-exact block encoders and decoders, one module per block family."""

from ggq.ggml import floats, iq4, kquants, legacy  # noqa: F401  (each family registers its formats on import)
from ggq.ggml.registry import (
    FORMATS,
    GGML_TYPES,
    BlockFormat,
    GGMLType,
    QuantError,
    dequantize,
    float_types,
    get,
    ggml_type,
    is_float,
    nbytes,
    quantize,
    register,
    type_by_id,
)

# the float types ggq writes (no blocks, never given an imatrix): ("F32", "F16", "BF16")
FLOAT_TYPES = float_types()

__all__ = [
    "FLOAT_TYPES",
    "FORMATS",
    "GGML_TYPES",
    "BlockFormat",
    "GGMLType",
    "QuantError",
    "dequantize",
    "get",
    "ggml_type",
    "is_float",
    "nbytes",
    "quantize",
    "register",
    "type_by_id",
]
