"""ggq's ggml type table (ggq/ggml/registry.py GGML_TYPES) against every other holder of the same
facts: ggml itself (ggml_get_type_traits, ggml_row_size, through ctypes), gguf-py's
GGMLQuantizationType / GGML_QUANT_SIZES, and the C++ encoders' own table (ggq._quants.types()).

A wrong id writes a tensor llama.cpp reads as another type; a wrong block or type size makes the
planner, the writer's tensor infos and the reader's layout checks disagree with llama.cpp.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

import ggq._quants as quants
from ggq import ggml
from ggq.ggml import registry
from tests import ggml_ref

# enum ggml_type's GGML_TYPE_COUNT at the pinned commit; test_type_count_is_the_headers checks it
GGML_TYPE_COUNT = 43


def test_table_is_ggmls_type_traits() -> None:
    """Every live ggml type id (a non-zero block size in type_traits) is in the table with ggml's
    name, block size and type size, and nothing else is: removed ids stay out."""
    live = {}
    for type_id in range(GGML_TYPE_COUNT):
        t = ggml_ref.traits(type_id)
        if t.blck_size:
            live[type_id] = (t.type_name.decode().upper(), t.blck_size, t.type_size)
    ours = {t.type_id: (t.name, t.block_size, t.type_size) for t in ggml.GGML_TYPES.values()}
    assert ours == live


@pytest.mark.parametrize("name", sorted(ggml.GGML_TYPES))
def test_nbytes_is_ggml_row_size(name: str) -> None:
    t = ggml.ggml_type(name)
    n_per_row = 3 * t.block_size
    assert ggml.nbytes(name, (n_per_row, 5, 2)) == 10 * ggml_ref.lib().ggml_row_size(t.type_id, n_per_row)
    assert ggml.type_by_id(t.type_id) is t


def test_float_types_are_ggmls_unquantized_floats() -> None:
    floats = {t.name for t in ggml.GGML_TYPES.values() if t.is_float}
    assert floats == {"F32", "F16", "BF16", "F64"}
    for name in floats:
        traits = ggml_ref.traits(ggml.ggml_type(name).type_id)
        assert not traits.is_quantized and traits.blck_size == 1
    assert ggml.FLOAT_TYPES == ("F32", "F16", "BF16")  # the ones ggq writes, in this order
    assert all(ggml.is_float(n) == (n in ggml.FLOAT_TYPES) for n in ggml.FORMATS)


def test_table_is_gguf_pys() -> None:
    """gguf-py (which llama.cpp's converter and gguf-dump use) names, numbers and sizes the same types."""
    theirs = {q.name: (int(q), *GGML_QUANT_SIZES[q]) for q in GGMLQuantizationType}
    ours = {t.name: (t.type_id, t.block_size, t.type_size) for t in ggml.GGML_TYPES.values()}
    assert ours == theirs


def test_registered_formats_take_the_tables_facts() -> None:
    for name, fmt in ggml.FORMATS.items():
        t = ggml.GGML_TYPES[name]
        assert (fmt.name, fmt.type_id, fmt.block_size, fmt.type_size, fmt.is_float) == (
            t.name,
            t.type_id,
            t.block_size,
            t.type_size,
            t.is_float,
        )


def test_native_table_agrees() -> None:
    """ggq._quants keeps its own (block, type size) per type in quants.cpp: the same numbers."""
    for name, (block, size) in quants.types().items():
        t = ggml.ggml_type(name)
        assert (t.block_size, t.type_size) == (block, size), name
        assert name in ggml.FORMATS


def test_unknown_names_and_ids_are_quant_errors() -> None:
    with pytest.raises(registry.QuantError, match="unknown ggml type 'Q7_K'"):
        ggml.nbytes("Q7_K", (256,))
    with pytest.raises(registry.QuantError, match="unknown ggml type id 4"):
        ggml.type_by_id(4)  # Q4_2, removed from ggml


def test_type_count_is_the_headers() -> None:
    header = Path(__file__).parents[1] / "vendor/llama.cpp/ggml/include/ggml.h"
    if not header.exists():
        pytest.skip("vendor/llama.cpp is not fetched")
    m = re.search(r"GGML_TYPE_COUNT\s*=\s*(\d+)", header.read_text())
    assert m is not None and int(m.group(1)) == GGML_TYPE_COUNT


def test_every_family_gives_solvers_a_code_grid() -> None:
    """GPTQ targets exactly the types with a code grid (tests/test_gptq.py checks each grid's
    levels and packing against ggml's dequantization); only IQ4_XS and the floats lack one."""
    with_grid = {name for name, fmt in ggml.FORMATS.items() if fmt.grid is not None}
    assert with_grid == set(ggml.FORMATS) - {"IQ4_XS", *ggml.FLOAT_TYPES}
    for name in with_grid:
        grid = ggml.get(name).grid
        assert grid is not None and ggml.get(name).block_size % grid.sub == 0
        assert grid.unit.dtype == np.float32 and np.all(np.diff(grid.unit) > 0), name
