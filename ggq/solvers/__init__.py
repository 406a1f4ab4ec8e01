"""Calibration-based solvers: GPTQ (and AWQ next) targeting ggml block formats."""
