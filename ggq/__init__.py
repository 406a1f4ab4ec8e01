"""ggq: calibration-based quantization of Qwen3 checkpoints into standard llama.cpp GGUF files."""

import os

__version__ = "0.1.0"

# MKL's strict conditional numerical reproducibility, read when torch's MKL first runs (torch is
# imported later, and only by the calibrated methods): without it, on some CPUs MKL's
# matrix products split their inner sums by the thread count (measured: with AVX2 kernels a
# (2048, 64) x (64, 2048) product differs between 1 and 2 threads), so a GPTQ file depended on the
# thread count through the attention forward. AUTO keeps the CPU's fastest kernels; STRICT fixes
# their order of additions. A value the user set is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
