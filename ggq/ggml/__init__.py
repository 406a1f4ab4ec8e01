"""ggml tensor types: byte-exact block encoders and decoders, one module per block family."""

from ggq.ggml import floats, iq4, kquants, legacy  # noqa: F401  (each family registers its formats on import)
from ggq.ggml.registry import FORMATS, BlockFormat, QuantError, dequantize, get, quantize, register

__all__ = ["FORMATS", "BlockFormat", "QuantError", "dequantize", "get", "quantize", "register"]
