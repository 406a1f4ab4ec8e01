"""Calibration-based solvers targeting ggml block formats: GPTQ, AWQ, and AWQ then GPTQ."""
