"""ggq: calibration-based quantization of Qwen3 checkpoints into standard llama.cpp GGUF files."""

__version__ = "0.1.0"
