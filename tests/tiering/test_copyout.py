"""tiering/copyout.py (TieredStore.copy_out): a chain written into a caller's region from every tier, cold blocks decoded
straight into it, each checked on the region's bytes; stops at a miss, a refused block, a damaged
block, the deadline or a block that does not fit."""

from __future__ import annotations

import time

import numpy as np
import pytest
from test_corruption import damaged_store
from tiering_helpers import LAYOUT, NS, cold_of, config, payload, tokens_for

from kvtier.tiering import TieredStore
from kvtier.tiering.crypto import RecordSealer
from kvtier.tiering.keys import chain_keys

BLOCK = LAYOUT.block_bytes()
ALIGN = 4096


def _region(blocks: int) -> np.ndarray:
    return np.zeros(blocks * -(-BLOCK // ALIGN) * ALIGN, dtype=np.uint8)


def _check(out, region, seq: int, first: int = 0) -> None:
    for i, (_key, block, _tier, offset) in enumerate(out.items):
        assert offset % ALIGN == 0
        assert region[offset:offset + block.nbytes].tobytes() == payload(seq, first + i)
        assert block.nbytes == BLOCK and block.shape == LAYOUT.shape(LAYOUT.block_tokens)


def test_memory_blocks_are_copied_byte_exact(make_store):
    s = make_store()
    keys = s.put(NS, tokens_for(1, 3), [payload(1, i) for i in range(3)]).keys
    region = _region(3)
    out = s.copy_out(keys, region)
    assert (out.stop, out.next_bytes, len(out.items)) == ("", 0, 3)
    assert {t for _, _, t, _ in out.items} <= {"hot", "warm"}
    _check(out, region, 1)


@pytest.mark.parametrize("promote", [True, False])
def test_cold_blocks_are_decoded_into_the_region(make_store, promote):
    s = make_store()
    keys = s.put(NS, tokens_for(2, 3), [payload(2, i) for i in range(3)], durable=True).keys
    s.close()
    s = make_store()  # a restart: everything is cold
    assert [s.where(k) for k in keys] == ["cold"] * 3
    region = _region(3)
    out = s.copy_out(keys, region, promote=promote)
    assert [t for _, _, t, _ in out.items] == ["cold"] * 3 and out.stop == ""
    _check(out, region, 2)
    region[:] = 0  # the region is the caller's: what the tiers keep is their own copy
    assert [s.where(k) for k in keys] == (["hot"] * 3 if promote else ["cold"] * 3)
    if promote:
        assert [s.get(k)[0].data.numpy().tobytes() for k in keys] == [payload(2, i) for i in range(3)]
    assert s.stats.tiers["cold"].hits == 3 and s.check() == []


def test_a_damaged_cold_block_ends_the_answer_as_a_miss(make_store, data_dir):
    s, keys = damaged_store(make_store, data_dir, 3)
    region = _region(3)
    out = s.copy_out(keys, region)
    assert [k for k, _, _, _ in out.items] == keys[:1] and out.stop == "miss"
    assert s.stats.tiers["cold"].checksum_failures == 1 and not cold_of(s).contains(keys[1])


def test_it_stops_where_the_region_is_full(make_store):
    s = make_store()
    keys = s.put(NS, tokens_for(4, 3), [payload(4, i) for i in range(3)]).keys
    out = s.copy_out(keys, _region(2))
    assert len(out.items) == 2 and (out.stop, out.next_bytes) == ("region", BLOCK)


def test_refused_and_missing_blocks_and_the_deadline(make_store):
    s = make_store()
    keys = s.put(NS, tokens_for(5, 2), [payload(5, i) for i in range(2)]).keys
    region = _region(3)
    out = s.copy_out(keys, region, accept=lambda ns_id: False)
    assert out.items == [] and out.stop == "miss"
    assert len(s.copy_out([keys[0], keys[1], keys[1]], region).items) == 3  # a key twice is copied twice
    out = s.copy_out([keys[0], chain_keys(NS, tokens_for(7, 1))[0], keys[1]], region)
    assert len(out.items) == 1 and out.stop == "miss"
    out = s.copy_out(keys, region, deadline=time.monotonic() - 1)
    assert out.items == [] and out.stop == "deadline"


def test_encrypted_cold_records_are_opened_then_decoded_into_the_region(data_dir):
    cfg = config(data_dir, hot_device="off", warm_capacity=0)
    with TieredStore(cfg, sealer=RecordSealer(bytes(range(32)))) as s:
        keys = s.put(NS, tokens_for(8, 2), [payload(8, i) for i in range(2)], durable=True).keys
        region = _region(2)
        out = s.copy_out(keys, region)
        assert [t for _, _, t, _ in out.items] == ["cold", "cold"]
        _check(out, region, 8)
