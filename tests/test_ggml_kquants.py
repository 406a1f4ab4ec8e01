"""ggq's K-quant encoders and decoders (Q2_K..Q6_K) against ggml itself, byte for byte.

The reference is ``ggml_quantize_chunk`` / ``to_float`` from the pinned libggml-base (tests/ggml_ref):
without an imatrix ggml takes the ``quantize_row_q*_K_ref`` path, with one the ``_impl`` path, so
every type is checked in both modes on inputs that reach the searches' corner cases.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import ggq.ggml.kquants as kq
from ggq.ggml import registry
from tests import ggml_ref

TYPES = list(kq.KQUANTS)  # Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
ROWS, COLS = 32, 4096


def _gaussian(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((ROWS, COLS)).astype(np.float32)


def _heavy_tailed(rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_t(2.0, (ROWS, COLS)).astype(np.float32)
    x.flat[rng.integers(0, x.size, 40)] *= 100  # a few 100x outliers set a super-block's scale
    return x


def _zero_super_block(rng: np.random.Generator) -> np.ndarray:
    x = _gaussian(rng)
    x[:, 256:512] = 0  # every row: one all-zero super-block (Q6_K's memset branch, qp's all-zero)
    x[3] = 0  # one all-zero row
    x[5, 1024:1040] = 0  # one all-zero sub-block inside a live super-block
    return x


def _constant_sub_blocks(rng: np.random.Generator) -> np.ndarray:
    x = _gaussian(rng)
    for s in range(0, COLS, 16):  # max == min in (scale, min) searches; D ~ 0 in least squares
        x[(s // 16) % 3 :: 3, s : s + 16] = rng.standard_normal()
    x[0, :512] = 0.5  # positive constants: min clamped to 0
    x[1, :512] = -0.25
    return x


def _tiny(rng: np.random.Generator) -> np.ndarray:
    return (_gaussian(rng) * np.float32(1e-8)).astype(np.float32)  # fp16 d underflows to 0


def _all_positive(rng: np.random.Generator) -> np.ndarray:
    return np.abs(_gaussian(rng))


def _all_negative(rng: np.random.Generator) -> np.ndarray:
    return -np.abs(_gaussian(rng))


def _mixed_magnitudes(rng: np.random.Generator) -> np.ndarray:
    # sub-blocks from 1e-9 to 1e2 in one super-block, and values large enough to overflow fp16 d
    scale = np.exp(rng.uniform(-20, 5, (ROWS, COLS // 16, 1))).astype(np.float32)
    x = (_gaussian(rng).reshape(ROWS, -1, 16) * scale).reshape(ROWS, COLS)
    x[2] *= np.float32(1e6)
    return x.astype(np.float32)


def _sparse(rng: np.random.Generator) -> np.ndarray:
    x = _gaussian(rng)
    x[rng.random(x.shape) < 0.9] = 0  # mostly zeros: many near-degenerate sub-blocks
    return x


def _grid(rng: np.random.Generator) -> np.ndarray:
    # values on a coarse grid: exact |x| ties of opposite sign (first maximum wins) and exact
    # halves under the candidate scales (nearest_int rounds half to even)
    return (np.round(_gaussian(rng) * 4) / 4).astype(np.float32)


INPUTS: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "gaussian": _gaussian,
    "heavy_tailed": _heavy_tailed,
    "zero_super_block": _zero_super_block,
    "constant_sub_blocks": _constant_sub_blocks,
    "tiny": _tiny,
    "all_positive": _all_positive,
    "all_negative": _all_negative,
    "mixed_magnitudes": _mixed_magnitudes,
    "sparse": _sparse,
    "grid": _grid,
}


def _rows(kind: str) -> np.ndarray:
    return INPUTS[kind](np.random.default_rng(sorted(INPUTS).index(kind)))


def _imatrix(kind: str) -> np.ndarray:
    rng = np.random.default_rng(100)
    if kind == "positive":
        return (rng.uniform(0.05, 2.0, COLS) ** 2).astype(np.float32)
    im = np.exp(rng.uniform(-15, 5, COLS)).astype(np.float32)  # "wide": 9 decades, some zeros
    im[rng.random(COLS) < 0.2] = 0
    im[:256] = 0  # a whole super-block of unused columns: sum of weights 0
    return im


def _assert_same_blocks(got: np.ndarray, ref: np.ndarray, type_name: str) -> None:
    size = kq.KQUANTS[type_name].type_size
    bad = (got.reshape(-1, size) != ref.reshape(-1, size)).any(axis=1)
    if bad.any():
        first = int(np.argmax(bad))
        byte = np.nonzero(got.reshape(-1, size)[first] != ref.reshape(-1, size)[first])[0]
        pytest.fail(
            f"{type_name}: {bad.sum()} of {bad.size} blocks differ from ggml "
            f"(first: block {first}, bytes {byte[:12].tolist()})"
        )


@pytest.mark.parametrize("kind", list(INPUTS))
@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_without_imatrix_matches_ggml(type_name: str, kind: str) -> None:
    """Guards the ref path: the search order, float32 op order, nearest_int and fp16 rounding."""
    rows = _rows(kind)
    type_id = kq.KQUANTS[type_name].type_id
    _assert_same_blocks(
        registry.quantize(rows, type_name, impl="numpy"), ggml_ref.quantize(rows, type_id), type_name
    )


# "positive": ordinary importances; "wide": zero and extreme ones (zero-weight sums, D <= 0 and
# all-zero qp inputs)
IMATRIX_CASES = [("positive", kind) for kind in INPUTS] + [
    ("wide", kind) for kind in ("gaussian", "heavy_tailed", "zero_super_block", "constant_sub_blocks")
]


@pytest.mark.parametrize(("imatrix", "kind"), IMATRIX_CASES)
@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_with_imatrix_matches_ggml(type_name: str, imatrix: str, kind: str) -> None:
    """Guards the imatrix (``_impl``) path: sigma2 weights, qkx3 / qp / qx searches."""
    rows, im = _rows(kind), _imatrix(imatrix)
    type_id = kq.KQUANTS[type_name].type_id
    got = registry.quantize(rows, type_name, im, impl="numpy")
    _assert_same_blocks(got, ggml_ref.quantize(rows, type_id, im), type_name)


@pytest.mark.parametrize("kind", ["gaussian", "heavy_tailed", "zero_super_block", "mixed_magnitudes"])
@pytest.mark.parametrize("type_name", TYPES)
def test_dequantize_matches_ggml_bit_for_bit(type_name: str, kind: str) -> None:
    """Guards the decoders: bit layouts (qh/hmask/scales packing) and the float op order."""
    rows = _rows(kind)
    type_id = kq.KQUANTS[type_name].type_id
    for im in (None, _imatrix("positive")):
        data = ggml_ref.quantize(rows, type_id, im)
        got = registry.dequantize(data, type_name, COLS)
        ref = ggml_ref.dequantize(data, type_id, COLS)
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), type_name


@pytest.mark.parametrize("type_name", TYPES)
def test_dequantize_arbitrary_bytes_matches_ggml(type_name: str) -> None:
    """Guards every bit of the layout, including combinations no encoder produces."""
    fmt = kq.KQUANTS[type_name]
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, (64, fmt.type_size), dtype=np.uint8)
    # finite d / dmin, so that the comparison is about the layout rather than NaN payloads
    for off in {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}[type_name]:
        raw[:, off : off + 2] = rng.uniform(-2, 2, (64, 1)).astype(np.float16).view(np.uint8)
    got = registry.dequantize(raw, type_name, kq.QK_K)
    ref = ggml_ref.dequantize(raw, fmt.type_id, kq.QK_K)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("type_name", TYPES)
def test_split_api_round_trips_ggml_blocks(type_name: str) -> None:
    """Guards the GPTQ-facing split: unpack -> pack is the identity on ggml's bytes, and
    ``encode`` under ggml's own scales gives ggml's codes (the requantization step)."""
    rows = _rows("heavy_tailed")[:8]
    fmt = kq.KQUANTS[type_name]
    for im in (None, _imatrix("positive")):
        ref = ggml_ref.quantize(rows, fmt.type_id, im).reshape(-1, fmt.type_size)
        codes, scales = kq.unpack(type_name, ref)
        assert np.array_equal(kq.pack(type_name, codes, scales), ref)
        x = rows.reshape(-1, kq.QK_K)
        assert np.array_equal(kq.encode(type_name, x, scales), codes)
        w = None if im is None else np.tile(im, len(rows)).reshape(-1, kq.QK_K)  # per block
        chosen = kq.choose_scales(type_name, x, w)
        assert np.array_equal(chosen.packed, scales.packed)
        assert np.array_equal(chosen.d.view(np.uint16), scales.d.view(np.uint16))
        step, offset = kq.step_offset(type_name, scales)
        sub = fmt.sub
        values = kq.decode(type_name, codes, scales).reshape(len(ref), -1, sub)
        q = codes.reshape(len(ref), -1, sub).astype(np.float32) - fmt.bias
        expect = step[:, :, None] * q - (offset[:, :, None] if fmt.has_min else 0)
        assert np.array_equal(values, expect)


def test_registered_formats() -> None:
    expected = {"Q2_K": (10, 84), "Q3_K": (11, 110), "Q4_K": (12, 144), "Q5_K": (13, 176), "Q6_K": (14, 210)}
    for name, (type_id, size) in expected.items():
        fmt = registry.get(name)
        assert (fmt.type_id, fmt.block_size, fmt.type_size) == (type_id, 256, size)
        assert ggml_ref.traits(type_id).type_size == size
        assert ggml_ref.traits(type_id).blck_size == 256


def test_bad_shapes_raise_quant_error() -> None:
    with pytest.raises(registry.QuantError, match="Q4_K"):
        registry.quantize(np.zeros((2, 300), np.float32), "Q4_K")
    with pytest.raises(registry.QuantError, match="Q6_K"):
        registry.get("Q6_K").quantize_blocks(np.zeros((2, 128), np.float32), None)
    with pytest.raises(registry.QuantError, match="Q3_K"):
        registry.get("Q3_K").dequantize_blocks(np.zeros((2, 100), np.uint8))
    with pytest.raises(registry.QuantError, match="K-quant"):
        kq.choose_scales("Q8_0", np.zeros((1, 256), np.float32))


@pytest.mark.parametrize("type_name", TYPES)
def test_chunk_seams_do_not_change_bytes(type_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the chunked encoder: an odd chunk size must give the same bytes as ggml."""
    monkeypatch.setattr(kq, "_CHUNK", 7)
    rows, im = _rows("heavy_tailed")[:4], _imatrix("positive")
    type_id = kq.KQUANTS[type_name].type_id
    for weights in (None, im):
        got = registry.quantize(rows, type_name, weights, impl="numpy")
        _assert_same_blocks(got, ggml_ref.quantize(rows, type_id, weights), type_name)
