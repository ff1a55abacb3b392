"""tiering.bytecopy: the fused copy + XXH3-64 gives the same bytes and hash as a copy then a hash."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtier.tiering.bytecopy import PARALLEL_MIN_BYTES, copy_checksum, copy_many

CHUNK = 256 << 10
from kvtier.tiering.codec import checksum


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17])
def test_copy_checksum_copies_and_hashes_the_destination(size):
    src = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    dst = np.zeros(size, dtype=np.uint8)
    assert copy_checksum(dst, src) == checksum(src)
    assert np.array_equal(dst, src)


def test_copy_checksum_takes_any_buffer():
    src = torch.arange(1000, dtype=torch.bfloat16)
    dst = bytearray(2000)
    assert copy_checksum(memoryview(dst), src.view(torch.uint8).numpy()) == checksum(bytes(dst))
    assert bytes(dst) == src.view(torch.uint8).numpy().tobytes()


def test_copy_checksum_refuses_different_sizes():
    with pytest.raises(ValueError, match="cannot copy 10 bytes into 9"):
        copy_checksum(np.empty(9, np.uint8), np.empty(10, np.uint8))


@pytest.mark.parametrize("blocks,size", [(3, 1000), (16, PARALLEL_MIN_BYTES // 8), (5, PARALLEL_MIN_BYTES)])
def test_copy_many_matches_one_by_one(blocks, size):
    rng = np.random.default_rng(blocks)
    srcs = [rng.integers(0, 256, size + i, dtype=np.uint8) for i in range(blocks)]
    dsts = [np.empty_like(s) for s in srcs]
    assert copy_many(list(zip(dsts, srcs))) == [checksum(s) for s in srcs]
    assert all(np.array_equal(d, s) for d, s in zip(dsts, srcs))


def test_copy_many_raises_for_a_bad_pair_on_any_thread():
    pairs = [(np.empty(PARALLEL_MIN_BYTES, np.uint8), np.ones(PARALLEL_MIN_BYTES, np.uint8)) for _ in range(4)]
    pairs[3] = (np.empty(8, np.uint8), np.ones(9, np.uint8))
    with pytest.raises(ValueError):
        copy_many(pairs)
