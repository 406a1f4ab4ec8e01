"""tools/bench_solver.py --vs-llama-cpp: RTN ggq convert beside llama.cpp's convert_hf_to_gguf.py
+ llama-quantize on the benchmark's checkpoint, and whether the two files hold the same tensors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ggq import testing

ROOT = Path(__file__).resolve().parent.parent


def test_rtn_side_by_side_with_llama_cpp(tmp_path: Path) -> None:
    spec = testing.Qwen3Spec(
        vocab_size=testing.QWEN3_VOCAB_ROWS, hidden_size=64, head_dim=32, intermediate_size=256, seed=2
    )
    ckpt = testing.build_checkpoint(tmp_path / "ckpt", spec)
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "bench_solver.py"),
        "--checkpoint",
        str(ckpt),
        "--methods",
        "",
    ]
    cmd += [
        "--vs-llama-cpp",
        "--type",
        "Q4_0",
        "--threads",
        "1",
        "--workdir",
        str(tmp_path),
        "--json",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every tensor equal, type and bytes" in done.stdout
    rtn = json.loads(out.read_text())["rtn_vs_llama_cpp"]
    assert rtn["differing"] == []
    for step in ("ggq", "convert_hf_to_gguf", "llama_quantize"):
        assert rtn[step]["seconds"] > 0 and rtn[step]["peak_rss_mib"] > 0
