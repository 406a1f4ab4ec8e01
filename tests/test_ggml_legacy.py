"""ggq's F32/F16/BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and IQ4_NL/IQ4_XS codecs against ggml itself.

Every encoder must give ggml_quantize_chunk's bytes exactly, and every decoder the type's ggml
to_float values exactly, without and with an imatrix (ggml ignores it for F32/F16/BF16/Q8_0).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np
import pytest

from ggq.ggml import floats, iq4, legacy, registry  # noqa: F401  (importing registers the types)
from tests import ggml_ref

TYPE_IDS = {
    "F32": 0,
    "F16": 1,
    "BF16": 30,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q5_0": 6,
    "Q5_1": 7,
    "Q8_0": 8,
    "IQ4_NL": 20,
    "IQ4_XS": 23,
}
QUANTS = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "IQ4_XS"]
# ggml weighs these by the mean square of the whole row: the block encoder needs n_per_row
ROW_SIGMA_TYPES = {"Q4_0", "Q4_1", "Q5_0", "Q5_1"}


def same_floats(ours: np.ndarray, ref: np.ndarray) -> bool:
    """Bit-identical float32, except that any NaN matches any NaN (x86 may pick either operand's
    payload when both operands of an add are NaN, and C compilers may swap commutative operands)."""
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    if ours.shape != ref.shape:
        return False
    nan = np.isnan(ref)
    return bool(
        np.array_equal(np.isnan(ours), nan)
        and np.array_equal(ours.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])
    )


def imatrix_for(n: int, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.exponential(1.0, n) + 1e-3).astype(np.float32)  # positive, spread like real ones


# ---------------------------------------------------------------- inputs


def gaussian(rng: np.random.Generator) -> np.ndarray:
    """64 rows of 4096, each row with its own scale (so each row has its own sigma2)."""
    scale = rng.uniform(0.01, 3.0, (64, 1))
    return (rng.standard_normal((64, 4096)) * scale).astype(np.float32)


def heavy_tailed(rng: np.random.Generator) -> np.ndarray:
    """Student-t rows with a few 100x outliers: the scale search must not be fooled by them."""
    x = rng.standard_t(2.5, (8, 1024))
    spots = rng.integers(0, x.size, 40)
    x.flat[spots] *= 100
    return x.astype(np.float32)


def zero_and_constant_blocks(rng: np.random.Generator) -> np.ndarray:
    """All-zero blocks and rows, constant blocks (positive, negative) and a lone nonzero value:
    d = max / -8 is -0.0 for a zero block and the max == min branches of the min/max formats."""
    x = rng.standard_normal((6, 512)).astype(np.float32)
    x[0, :256] = 0.0  # a zero super-block too
    x[1] = 0.0  # a whole zero row: sigma2 = 0
    x[2, :64] = 0.75
    x[2, 64:128] = -1.25
    x[2, 256:512] = 3.0
    x[3, 32:64] = 0.0
    x[3, 40] = -2.0
    x[4, :32] = 1e-16  # below GROUP_MAX_EPS
    x[5, ::2] = 0.0
    return x


def signed_zeros(rng: np.random.Generator) -> np.ndarray:
    """Blocks mixing +0.0 and -0.0 (with positives or alone): the first zero found must win the
    running min/max, so the fp16 sign of m (and of d) follows ggml."""
    x = np.abs(rng.standard_normal((4, 256))).astype(np.float32)
    x[0, ::3] = -0.0
    x[0, 1::3] = 0.0
    x[1, :32] = -0.0
    x[1, 32:64] = np.where(np.arange(32) % 2, 0.0, -0.0)
    x[2] = -x[2]
    x[2, 5::7] = -0.0
    x[3, :128] = np.where(np.arange(128) % 5 == 0, -0.0, 0.0)
    return x


def tiny_values(rng: np.random.Generator) -> np.ndarray:
    """Values around 1e-8: scales near fp16's subnormal range, 1/d large."""
    return (rng.standard_normal((4, 1024)) * 1e-8).astype(np.float32)


def large_values(rng: np.random.Generator) -> np.ndarray:
    """Values around 1e4: scales near fp16's upper range."""
    return (rng.standard_normal((4, 1024)) * 1e4).astype(np.float32)


def half_steps(rng: np.random.Generator) -> np.ndarray:
    """Integer and half-integer values with a block max giving d = 1 exactly: the rounding rules
    collide here (truncation of x/d + 8.5, roundf half away from zero for Q8_0, nearest_int half
    to even in the imatrix searches, best_index_int8's tie to the upper table entry)."""
    x = (rng.integers(-16, 17, (8, 1024)) / 2.0).astype(np.float32)
    x[:, ::32] = -8.0  # Q4_0: d = -8 / -8 = 1
    x[1, ::32] = 127.0  # Q8_0: d = 1
    x[2, ::32] = -16.0  # Q5_0: d = 1
    x[3] = (rng.integers(0, 31, 1024) + 0.5).astype(np.float32)
    x[3, ::32], x[3, 1::32] = 0.0, 15.0  # Q4_1: d = 1, m = 0
    mids = (iq4.KVALUES_IQ4NL[:-1] + iq4.KVALUES_IQ4NL[1:]) / 2  # IQ4 table midpoints
    x[4] = rng.choice(np.concatenate([mids, iq4.KVALUES_IQ4NL]), 1024)
    x[4, ::32] = -127.0
    return x


CASES: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "gaussian": gaussian,
    "heavy_tailed": heavy_tailed,
    "zero_and_constant_blocks": zero_and_constant_blocks,
    "signed_zeros": signed_zeros,
    "tiny_values": tiny_values,
    "large_values": large_values,
    "half_steps": half_steps,
}


# ---------------------------------------------------------------- encoders and decoders vs ggml


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", QUANTS)
def test_quantize_matches_ggml(name: str, case: str, with_imatrix: bool) -> None:
    """Byte-exact blocks for every type and input family; guards each rounding, clamp, tie-break,
    sum order and packing detail of ggml's encoders (the input docstrings name the risky ones)."""
    rows = CASES[case](np.random.default_rng(zlib.crc32(f"{name}/{case}".encode())))
    imatrix = imatrix_for(rows.shape[1]) if with_imatrix else None
    ours = registry.quantize(rows, name, imatrix, impl="numpy")
    ref = ggml_ref.quantize(rows, TYPE_IDS[name], imatrix)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    bad = np.flatnonzero((ours != ref).any(axis=0))
    assert np.array_equal(ours, ref), f"{name} {case}: {bad.size} byte columns differ, first {bad[:8]}"
    # the decoder on what ggml wrote
    n = rows.shape[1]
    assert same_floats(registry.dequantize(ref, name, n), ggml_ref.dequantize(ref, TYPE_IDS[name], n))


@pytest.mark.parametrize("name", QUANTS)
def test_imatrix_with_zero_columns_matches_ggml(name: str) -> None:
    """Real imatrices have zero entries (columns never activated): whole blocks of zero weight make
    every weighted sum zero, so the searches fall back to their first guess; guards those branches."""
    rows = heavy_tailed(np.random.default_rng(13))
    imatrix = imatrix_for(rows.shape[1])
    imatrix[:256] = 0.0  # whole blocks and a whole IQ4_XS super-block
    imatrix[300:700:3] = 0.0  # scattered
    ours = registry.quantize(rows, name, imatrix, impl="numpy")
    assert np.array_equal(ours, ggml_ref.quantize(rows, TYPE_IDS[name], imatrix))


@pytest.mark.parametrize("name", [*QUANTS, "F16", "BF16"])
def test_dequantize_random_bytes_matches_ggml(name: str) -> None:
    """Arbitrary block bytes (every code, fp16 scales that are subnormal, inf or NaN, IQ4_XS
    multipliers over the whole 6 bits) decode to ggml's floats: guards the unpacking layout."""
    fmt = registry.get(name)
    n = 4 * fmt.block_size if fmt.block_size > 1 else 256
    raw = np.random.default_rng(3).integers(0, 256, (16, n // fmt.block_size * fmt.type_size), dtype=np.uint8)
    assert same_floats(registry.dequantize(raw, name, n), ggml_ref.dequantize(raw, TYPE_IDS[name], n))


@pytest.mark.parametrize("name", QUANTS)
def test_quantize_output_decodes_to_ggml_values(name: str) -> None:
    """Round trip: ggq's own bytes decode (by ggq) to exactly what ggml decodes them to, and close
    to the input; guards a decoder that only agrees with ggml on ggml-written blocks."""
    rows = np.random.default_rng(11).standard_normal((4, 1024)).astype(np.float32)
    data = registry.quantize(rows, name, impl="numpy")
    values = registry.dequantize(data, name, 1024)
    assert same_floats(values, ggml_ref.dequantize(data, TYPE_IDS[name], 1024))
    assert np.sqrt(np.mean((values - rows) ** 2)) < 0.2


# ---------------------------------------------------------------- float types


def float_patterns() -> np.ndarray:
    """Random float32 bit patterns (every class: subnormal, normal, inf, quiet and signalling NaN)
    plus the values at fp16/bf16 rounding ties and the fp16 overflow threshold."""
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2**32, 1 << 16, dtype=np.uint64).astype(np.uint32)
    specials = np.array(
        [
            0.0,
            -0.0,
            1.0 + 2.0**-11,
            1.0 + 3 * 2.0**-11,
            65504.0,
            65519.99,
            65520.0,
            1e6,
            2.0**-25,
            3 * 2.0**-26,
        ],
        dtype=np.float32,
    )
    ties = np.arange(0x3F800000, 0x3F800000 + (1 << 20), 0x1000, dtype=np.uint32).view(np.float32)
    nans = np.array([0x7F800001, 0xFF800001, 0x7FC00000, 0x7FBFFFFF, 0x7F80FFFF, 0xFFFFFFFF], dtype=np.uint32)
    values = np.concatenate([bits.view(np.float32), specials, -specials, ties, nans.view(np.float32)])
    return np.concatenate([values, np.zeros(-values.size % 16, np.float32)]).reshape(-1, 16)


@pytest.mark.parametrize("name", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
def test_float_types_match_ggml(name: str, with_imatrix: bool) -> None:
    """F16 rounds to nearest even and overflows at 65520 with NaN -> 0x7E00 (numpy would keep
    payloads); BF16 rounds to nearest even with NaN -> upper bits | 0x40; F32 is a copy."""
    rows = float_patterns()
    imatrix = imatrix_for(rows.shape[1]) if with_imatrix else None
    ours = registry.quantize(rows, name, imatrix, impl="numpy")
    assert np.array_equal(ours, ggml_ref.quantize(rows, TYPE_IDS[name], imatrix))
    back = registry.dequantize(ours, name, rows.shape[1])
    if name == "F32":  # ggml has no to_float for F32: the bytes are the values
        assert np.array_equal(back.view(np.uint32), rows.view(np.uint32))
    else:  # no arithmetic in these decoders: NaN payloads must match bit for bit too
        ref = ggml_ref.dequantize(ours, TYPE_IDS[name], rows.shape[1])
        assert np.array_equal(back.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("name", ["F16", "BF16"])
def test_every_half_pattern_decodes_like_ggml(name: str) -> None:
    """All 65536 fp16 / bf16 patterns, bit for bit: guards ggml's quieting of signalling NaNs."""
    raw = np.arange(1 << 16, dtype="<u2").view(np.uint8).reshape(-1, 512)
    ours = registry.dequantize(raw, name, 256)
    assert np.array_equal(ours.view(np.uint32), ggml_ref.dequantize(raw, TYPE_IDS[name], 256).view(np.uint32))


# ---------------------------------------------------------------- errors and the registry


@pytest.mark.parametrize(("name", "n"), [("Q4_0", 48), ("Q8_0", 100), ("IQ4_XS", 4128)])
def test_row_not_whole_blocks_raises_with_the_numbers(name: str, n: int) -> None:
    """A row length that is not a whole number of blocks is refused, naming both numbers."""
    block = registry.get(name).block_size
    with pytest.raises(registry.QuantError, match=rf"{name}.*{n}.*{block}"):
        registry.quantize(np.zeros((2, n), dtype=np.float32), name)


@pytest.mark.parametrize("name", sorted(ROW_SIGMA_TYPES))
def test_imatrix_without_row_length_is_refused(name: str) -> None:
    """The imatrix path of Q4_0/Q4_1/Q5_0/Q5_1 depends on the whole row: without n_per_row the
    block encoder refuses instead of guessing (a guess is silently wrong for several rows)."""
    x = np.ones((4, 32), dtype=np.float32)
    with pytest.raises(registry.QuantError, match="n_per_row"):
        registry.get(name).quantize_blocks(x, x)
    with pytest.raises(registry.QuantError, match="rows of 96"):
        registry.get(name).quantize_blocks(x, x, n_per_row=96)  # type: ignore[call-arg]


@pytest.mark.parametrize("name", QUANTS)
def test_registry_quantize_with_imatrix_multirow(name: str) -> None:
    """The public path, several rows with an imatrix, byte-exact: Q4_0/Q4_1/Q5_0/Q5_1 weight by
    the mean square of each *row*, so the registry must pass the row length to their encoders."""
    rows = np.random.default_rng(2).standard_normal((4, 512)).astype(np.float32)
    imatrix = imatrix_for(512)
    assert np.array_equal(
        registry.quantize(rows, name, imatrix, impl="numpy"), ggml_ref.quantize(rows, TYPE_IDS[name], imatrix)
    )
