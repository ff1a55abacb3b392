"""tiering/layout.py: block shapes and byte sizes."""

from __future__ import annotations

import pytest

from kvtier.tiering import BlockLayout, InvalidBlock
from kvtier.tiering.layout import DTYPE_BY_CODE, DTYPES, MAX_BLOCK_BYTES, itemsize


def test_sizes_and_shape():
    lay = BlockLayout("bfloat16", layers=30, kv_heads=3, head_dim=64, block_tokens=16)
    assert lay.shape() == (2, 30, 3, 16, 64)
    assert lay.shape(5) == (2, 30, 3, 5, 64)
    assert lay.block_bytes() == 2 * 30 * 3 * 16 * 64 * 2
    assert lay.block_bytes(1) * 16 == lay.block_bytes()
    assert lay.tokens_for(lay.block_bytes(7)) == 7
    assert lay.describe() == "bfloat16:30x3x64/16"


@pytest.mark.parametrize("nbytes", [0, 1, 2 * 2 * 30 * 3 * 64 * 17, 2 * 2 * 30 * 3 * 64 + 1])
def test_tokens_for_rejects_odd_sizes(nbytes):
    lay = BlockLayout("float16", 30, 3, 64, 16)
    with pytest.raises(InvalidBlock):
        lay.tokens_for(nbytes)


@pytest.mark.parametrize("kw", [dict(layers=0), dict(kv_heads=-1), dict(head_dim=1 << 17), dict(block_tokens=1.0)])
def test_bad_dims(kw):
    args = dict(dtype="float16", layers=1, kv_heads=1, head_dim=4, block_tokens=4) | kw
    with pytest.raises(InvalidBlock) as exc:
        BlockLayout(**args)
    assert exc.value.field == f"layout.{next(iter(kw))}"


def test_unknown_dtype_and_absurd_block():
    with pytest.raises(InvalidBlock):
        BlockLayout("float64", 1, 1, 1, 1)
    with pytest.raises(InvalidBlock):
        BlockLayout("float32", 1 << 10, 1 << 10, 1 << 10, 1)
    assert BlockLayout("uint8", 1, 1, 1, 1).block_bytes() < MAX_BLOCK_BYTES


def test_dtype_codes_are_stable():
    # On-disk format: these numbers must never change.
    assert {n: c for n, (_, c) in DTYPES.items()} == {"float32": 1, "float16": 2, "bfloat16": 3, "float8_e4m3fn": 4,
                                                      "float8_e5m2": 5, "uint8": 6, "int8": 7}
    assert all(DTYPE_BY_CODE[DTYPES[n][1]] == n for n in DTYPES)
    assert itemsize("float8_e5m2") == 1 and itemsize("float32") == 4
