"""Type stub of the C++ extension ggq._quants (native/src/quants.cpp)."""

import numpy as np

def quantize(
    type_name: str, rows: np.ndarray, imatrix: np.ndarray | None = None, n_threads: int = 0
) -> np.ndarray:
    """Encode (n_rows, n_per_row) float32 C-contiguous rows -> (n_rows, row_bytes) uint8."""

def types() -> dict[str, tuple[int, int]]:
    """The types with a native encoder: {name: (block_size, type_size)}."""
