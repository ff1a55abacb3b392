"""Damaged cold records: a get is a miss (never wrong bytes), counted, and the record is removed."""

from __future__ import annotations

import pytest
from tiering_helpers import NS, cold_of, payload, tokens_for

from kvtier.tiering.codec import HEADER
from tests.fixtures.records import flip_record as _flip


def damaged_store(make_store, data_dir: str, seq: int):
    """A store reopened over 3 durable blocks of ``seq`` whose middle record has one byte flipped;
    returns it and the 3 keys."""
    s = make_store()
    keys = s.put(NS, tokens_for(seq, 3), [payload(seq, i) for i in range(3)], durable=True).keys
    s.close()
    _flip(data_dir, keys[1], lambda n: n - 2)
    return make_store(), keys


@pytest.mark.parametrize("where", ["payload-middle", "payload-last", "header-checksum", "header-shape", "magic"])
@pytest.mark.parametrize("codec", ["shuffle_zstd", "zstd", "raw"])
def test_flipped_byte_is_a_miss(make_store, data_dir, where, codec):
    at = {"payload-middle": lambda n: (HEADER.size + n) // 2, "payload-last": lambda n: n - 1,
          "header-checksum": lambda n: HEADER.size - 3, "header-shape": lambda n: 13, "magic": lambda n: 0}[where]
    s = make_store(codec=codec)
    keys = s.put(NS, tokens_for(1, 3), [payload(1, i) for i in range(3)], durable=True).keys
    s.close()
    _flip(data_dir, keys[1], at)

    s = make_store(codec=codec)
    assert s.where(keys[1]) == "cold"
    assert s.get(keys[1]) is None
    assert s.stats.tiers["cold"].checksum_failures == 1
    assert s.where(keys[1]) is None and not cold_of(s).contains(keys[1])  # the damaged record is gone
    assert s.get(keys[1]) is None and s.stats.tiers["cold"].checksum_failures == 1  # a plain miss now
    for i in (0, 2):  # neighbours are untouched
        assert s.get(keys[i])[0].data.numpy().tobytes() == payload(1, i)
    assert s.lookup(NS, tokens_for(1, 3)).blocks == 1  # the prefix stops at the hole
    assert s.check() == []


def test_corrupt_block_in_iteration_and_prefetch(make_store, data_dir):
    s, keys = damaged_store(make_store, data_dir, 2)
    out = list(s.iter_blocks(keys))
    assert [b is None for _, b, _ in out] == [False, True]
    assert s.prefetch(keys).future.result(5) == 1
    assert s.stats.tiers["cold"].checksum_failures == 1
