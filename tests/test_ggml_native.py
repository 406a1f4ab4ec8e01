"""ggq._quants (the C++ block encoders) against ggml itself, byte for byte.

Every native type is checked on the input families of test_ggml_kquants / test_ggml_legacy,
without an imatrix (ggml's ``_ref`` paths) and with two kinds of imatrix (the ``_impl`` paths),
on several row counts, and with the rows split over 1..7 threads. The numpy encoders, which
``registry.quantize`` no longer reaches for these types by default, are checked against the
same bytes through ``impl="numpy"``.
"""

from __future__ import annotations

import zlib
from functools import cache

import numpy as np
import pytest

import ggq._quants as quants
from ggq.ggml import registry
from tests import ggml_ref
from tests import test_ggml_kquants as kq_tests
from tests import test_ggml_legacy as legacy_tests

NATIVE = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]
IMATRIX_MODES = ["none", "positive", "sparse"]


@cache
def _inputs() -> dict[str, np.ndarray]:
    """The K-quant families (32 x 4096) and the legacy ones (4..64 rows of 256..4096)."""
    rows = {f"k-{kind}": kq_tests._rows(kind) for kind in kq_tests.INPUTS}
    for case, make in legacy_tests.CASES.items():
        rows[f"legacy-{case}"] = make(np.random.default_rng(zlib.crc32(case.encode())))
    return rows


def _imatrix(mode: str, n: int) -> np.ndarray | None:
    if mode == "none":
        return None
    if mode == "positive":
        return legacy_tests.imatrix_for(n)
    # "sparse": nine decades, a fifth of the columns zero and a whole super-block of zeros
    rng = np.random.default_rng(100)
    im = np.exp(rng.uniform(-15, 5, n)).astype(np.float32)
    im[rng.random(n) < 0.2] = 0
    im[:256] = 0
    return im


def _native(rows: np.ndarray, name: str, imatrix: np.ndarray | None, n_threads: int = 1) -> np.ndarray:
    return quants.quantize(name, np.ascontiguousarray(rows), imatrix, n_threads)


def _reference(rows: np.ndarray, name: str, imatrix: np.ndarray | None) -> np.ndarray:
    return ggml_ref.quantize(rows, registry.get(name).type_id, imatrix)


def _assert_same(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert got.dtype == np.uint8 and got.shape == ref.shape, f"{what}: {got.dtype} {got.shape} vs {ref.shape}"
    if not np.array_equal(got, ref):
        rows, cols = np.nonzero(got != ref)
        pytest.fail(f"{what}: {rows.size} bytes differ from ggml (first: row {rows[0]}, byte {cols[0]})")


def test_native_types_are_the_registered_ones() -> None:
    assert sorted(quants.types()) == sorted(NATIVE)
    assert registry.native_types() == frozenset(NATIVE)
    for name, (block, size) in quants.types().items():
        fmt = registry.get(name)
        assert (fmt.block_size, fmt.type_size) == (block, size)


@pytest.mark.parametrize("mode", IMATRIX_MODES)
@pytest.mark.parametrize("kind", sorted(_inputs()))
@pytest.mark.parametrize("name", NATIVE)
def test_native_matches_ggml(name: str, kind: str, mode: str) -> None:
    """Byte-exact with ggml_quantize_chunk on 1 row, an odd count and all rows: guards every
    search, rounding, tie-break and packing detail (the input docstrings of the numpy tests name
    the corner cases), the per-row imatrix offsets and the per-row sigma2 of Q4_0..Q5_1."""
    rows = _inputs()[kind]
    imatrix = _imatrix(mode, rows.shape[1])
    for n in sorted({1, 3, rows.shape[0]}):
        _assert_same(
            _native(rows[:n], name, imatrix), _reference(rows[:n], name, imatrix), f"{name} {kind} {n} rows"
        )


@pytest.mark.parametrize("name", NATIVE)
def test_row_lengths_that_are_not_256_multiples(name: str) -> None:
    """5 rows of 11 blocks (352 values; 2816 for the 256-weight types): the 32-weight types search
    8 blocks at a time and the last 3 one by one; guards that seam and the row strides."""
    block = registry.get(name).block_size
    rows = np.random.default_rng(17).standard_t(3.0, (5, 11 * block)).astype(np.float32)
    for imatrix in (None, legacy_tests.imatrix_for(11 * block)):
        ref = _reference(rows, name, imatrix)
        for n_threads in (1, 2):
            got = _native(rows, name, imatrix, n_threads)
            _assert_same(got, ref, f"{name} 5x{11 * block} threads={n_threads}")


@pytest.mark.parametrize("name", NATIVE)
def test_thread_counts_give_identical_bytes(name: str) -> None:
    """Rows split over 1, 2, 3 and 7 threads (more threads than some ranges have rows): guards the
    split arithmetic; every count must give ggml's bytes."""
    rows = _inputs()["k-heavy_tailed"][:13]
    for imatrix in (None, _imatrix("positive", rows.shape[1])):
        ref = _reference(rows, name, imatrix)
        for n_threads in (1, 2, 3, 7, 0):
            _assert_same(_native(rows, name, imatrix, n_threads), ref, f"{name} threads={n_threads}")


# the numpy searches also compute lanes they then mask out (x / 0, overflow on values ~1e4)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("mode", IMATRIX_MODES)
@pytest.mark.parametrize("name", NATIVE)
def test_numpy_and_native_give_the_same_bytes(name: str, mode: str) -> None:
    """Both implementations behind registry.quantize stay byte-exact (numpy through impl="numpy")."""
    for kind, rows in _inputs().items():
        rows = rows[:4]
        imatrix = _imatrix(mode, rows.shape[1])
        native = registry.quantize(rows, name, imatrix, impl="native")
        _assert_same(registry.quantize(rows, name, imatrix, impl="numpy"), native, f"numpy {name} {kind}")
        _assert_same(registry.quantize(rows, name, imatrix), native, f"auto {name} {kind}")


@pytest.mark.parametrize("name", NATIVE)
def test_non_finite_values_match_ggml(name: str) -> None:
    """inf, -inf, NaN and 3e38 among the values (convert refuses them; the encoders still must not
    diverge from ggml): guards the element-wise fallback of the lane-wise roundings and the rule
    that NaN never wins a max / min comparison."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 1024)).astype(np.float32)
    x[0, 5], x[1, 300], x[2, 77], x[5, 3] = np.inf, -np.inf, np.nan, 3e38
    x[3, 600:640] = np.nan
    x[4, ::97] = np.inf
    for imatrix in (None, legacy_tests.imatrix_for(1024)):
        _assert_same(_native(x, name, imatrix), _reference(x, name, imatrix), f"{name} non-finite")


def test_zero_rows() -> None:
    out = quants.quantize("Q6_K", np.zeros((0, 512), np.float32), None, 4)
    assert out.shape == (0, 2 * 210) and out.dtype == np.uint8


# ---------------------------------------------------------------- the binding's checks


def test_rows_must_be_float32() -> None:
    with pytest.raises(TypeError, match=r"rows must be float32, got float64"):
        quants.quantize("Q4_K", np.zeros((2, 256)), None, 1)


def test_rows_must_be_c_contiguous() -> None:
    x = np.zeros((4, 512), np.float32)
    with pytest.raises(ValueError, match=r"rows must be C-contiguous \(shape \(4, 256\)\)"):
        quants.quantize("Q4_K", x[:, ::2], None, 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        quants.quantize("Q8_0", np.asfortranarray(np.zeros((4, 64), np.float32)), None, 1)


@pytest.mark.parametrize("shape", [(256,), (2, 2, 256)])
def test_rows_must_be_2d(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"rows must be 2-D"):
        quants.quantize("Q6_K", np.zeros(shape, np.float32), None, 1)


def test_row_length_must_be_whole_blocks() -> None:
    with pytest.raises(ValueError, match=r"Q5_K: row length 300 is not a multiple of the block size 256"):
        quants.quantize("Q5_K", np.zeros((2, 300), np.float32), None, 1)


def test_imatrix_is_checked() -> None:
    x = np.zeros((2, 512), np.float32)
    with pytest.raises(ValueError, match=r"imatrix has shape \(256,\), expected \(512,\)"):
        quants.quantize("Q4_K", x, np.ones(256, np.float32), 1)
    with pytest.raises(ValueError, match=r"imatrix has shape \(1, 512\), expected \(512,\)"):
        quants.quantize("Q4_K", x, np.ones((1, 512), np.float32), 1)
    with pytest.raises(TypeError, match=r"imatrix must be float32, got float64"):
        quants.quantize("Q4_K", x, np.ones(512), 1)
    with pytest.raises(ValueError, match=r"imatrix must be C-contiguous"):
        quants.quantize("Q4_K", x, np.ones(1024, np.float32)[::2], 1)
    with pytest.raises(TypeError, match=r"imatrix must be a numpy array or None"):
        quants.quantize("Q4_K", x, [1.0] * 512, 1)


def test_unknown_type_and_bad_thread_count() -> None:
    x = np.zeros((1, 256), np.float32)
    with pytest.raises(ValueError, match=r"no native encoder for type 'F16'; native types: Q4_0, "):
        quants.quantize("F16", x, None, 1)
    with pytest.raises(ValueError, match=r"n_threads must be >= 0"):
        quants.quantize("Q4_0", x, None, -1)


# ---------------------------------------------------------------- registry dispatch


def test_registry_impl_choice() -> None:
    """impl="auto" takes numpy for the types without a native encoder; impl="native" refuses them."""
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    assert np.array_equal(registry.quantize(x, "F16"), x.astype(np.float16).view(np.uint8))
    with pytest.raises(
        registry.QuantError, match=r"F16: impl='native' asked, but the extension ggq._quants has no"
    ):
        registry.quantize(x, "F16", impl="native")
    with pytest.raises(registry.QuantError, match=r"impl must be 'auto', 'native' or 'numpy', got 'fast'"):
        registry.quantize(x, "Q4_K", impl="fast")  # type: ignore[arg-type]


def test_registry_converts_before_the_native_call() -> None:
    """registry.quantize accepts what the binding refuses (float64, strided rows, a float64
    imatrix) by converting first, so convert's callers never meet the binding's errors."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 1024))
    im = rng.uniform(0.1, 2.0, 512)
    want = _reference(x[:, ::2].astype(np.float32), "Q4_K", im.astype(np.float32))
    assert np.array_equal(registry.quantize(x[:, ::2], "Q4_K", im, n_threads=2), want)
