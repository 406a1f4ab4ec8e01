"""llama.cpp importance matrices (the GGUF format written by llama-imatrix).

Each weight ``W`` has ``W.in_sum2`` (sum of squared input activations per column, per expert)
and ``W.counts`` (tokens seen); the importance llama-quantize uses is ``in_sum2 / counts``
in float32, or 1 where nothing was seen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ggq.gguf import GGUFFormatError, read_gguf


class ImatrixError(ValueError):
    """An imatrix file that cannot be used; names the file and entry."""


def load_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """Tensor name -> (n_per_row,) float32 importance (first expert's slice for dense models)."""
    path = Path(path)
    try:
        gg = read_gguf(path)
    except (GGUFFormatError, OSError) as exc:
        raise ImatrixError(f"{path}: not a llama.cpp imatrix GGUF ({exc})") from exc
    out: dict[str, np.ndarray] = {}
    for name in gg.tensors:
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        if base + ".counts" not in gg.tensors:
            raise ImatrixError(f"{path}: {name} has no matching {base}.counts")
        sums = gg.tensor_f32(name)  # (n_expert, n_per_row)
        counts = gg.tensor_f32(base + ".counts").reshape(-1)  # (n_expert,)
        sums = sums.reshape(counts.shape[0], -1)
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.where(counts[:, None] > 0, sums / counts[:, None].astype(np.float32), np.float32(1))
        if not np.all(np.isfinite(values)):
            raise ImatrixError(f"{path}: {base} contains non-finite values")
        out[base] = (
            values.astype(np.float32).reshape(-1) if counts.shape[0] == 1 else values.astype(np.float32)
        )
    if not out:
        raise ImatrixError(f"{path}: no .in_sum2 entries (not an imatrix file?)")
    return out
