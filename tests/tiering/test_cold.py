"""tiering/cold/: LMDB records, oldest-first eviction (by the cold policy), pins, indexes."""

from __future__ import annotations

import os
from unittest import mock

import lmdb
import pytest
import torch

from kvtier.tiering.codec import Codec, checksum
from kvtier.tiering.cold import ColdTier, ColdWrite
from kvtier.tiering.errors import CapacityExceeded, TierUnavailable
from kvtier.tiering.keys import BlockKey
from kvtier.tiering.tier import Block

NS_A, NS_B = b"a" * 16, b"b" * 16


def K(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(16, "big"))


def block(i: int, n: int = 4096, ns: bytes = NS_A) -> Block:
    data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
    return Block(data, "uint8", (2, 1, 1, n // 2, 1), checksum(data.numpy()), ns)


def write(cold: ColdTier, i: int, n: int = 4096, ns: bytes = NS_A, **kw) -> list[BlockKey]:
    """Write block ``i`` as the writer does: making room by the cold policy (no pins unless ``protected``)."""
    kw.setdefault("protected", lambda k: False)
    b = block(i, n, ns)
    return cold.write_batch([ColdWrite(K(i), cold.codec.encode(b.data.numpy(), b.dtype, b.shape), ns)], **kw)


def audit(cold: ColdTier) -> None:
    assert cold.check() == []
    """The indexes agree with each other and with the ``used`` count."""
    with cold.env.begin() as txn:
        metas = {bytes(k): bytes(v) for k, v in txn.cursor(db=cold.db["meta"])}
        blocks = {bytes(k) for k, _ in txn.cursor(db=cold.db["blocks"])}
        order = {bytes(v) for _, v in txn.cursor(db=cold.db["order"])}
        ns = {bytes(v) for _, v in txn.cursor(db=cold.db["ns_keys"])}
    assert set(metas) == blocks == order == ns
    assert sum(int.from_bytes(m[-4:], "big") for m in metas.values()) == cold.used_bytes <= cold.capacity_bytes


def test_put_get_delete(cold):
    b = block(1)
    cold.put(K(1), b)
    assert cold.contains(K(1)) and cold.contains_many([K(1), K(2)]) == [True, False]
    got = cold.get(K(1))
    assert got.data.numpy().tobytes() == b.data.numpy().tobytes() and got.ns_id == NS_A and got.shape == b.shape
    assert cold.get(K(2)) is None and cold.block_count() == 1 and list(cold.keys()) == [K(1)]
    assert cold.stored_raw_bytes() == 4096
    assert cold.delete(K(1)) and not cold.delete(K(1)) and cold.used_bytes == 0
    audit(cold)


def test_overwrite_keeps_accounting(cold):
    write(cold, 1, 4096)
    write(cold, 1, 100)  # same key, other size
    assert cold.block_count() == 1
    audit(cold)


def test_full_map_evicts_oldest_first_never_crashes(cold):
    evicted = []
    for i in range(400):  # ~3x the map
        evicted += write(cold, i)
    assert evicted and evicted == sorted(evicted, key=lambda k: int.from_bytes(k.digest, "big"))
    kept = sorted(int.from_bytes(k.digest, "big") for k in cold.keys())
    assert kept == list(range(kept[0], 400))  # a suffix of the write order survives
    audit(cold)


def test_pinned_blocks_survive_and_all_pinned_raises(cold):
    for i in range(50):
        write(cold, i)
    pinned = set(cold.keys())
    with pytest.raises(CapacityExceeded):
        for i in range(100, 400):
            write(cold, i, protected=lambda k: k in pinned or int.from_bytes(k.digest, "big") >= 100)
    assert pinned <= set(cold.keys())
    audit(cold)


def test_map_full_error_evicts_in_its_own_transaction(cold):
    """LMDB can fill before our estimate says so: room is made in a committed txn, then retried."""
    for i in range(10):
        write(cold, i)
    real = cold._write
    calls = []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise lmdb.MapFullError("full")
        return real(*a, **kw)

    with mock.patch.object(cold, "_write", side_effect=flaky):
        evicted = write(cold, 99)
    assert len(calls) == 2 and K(0) in evicted and cold.contains(K(99)) and not cold.contains(K(0))
    audit(cold)


def test_namespace_index_and_sessions(cold):
    write(cold, 1, ns=NS_A)
    write(cold, 2, ns=NS_B, sessions={b"t\0s": b"{}"}, namespaces={NS_B: b'{"x":1}'})
    write(cold, 3, ns=NS_B, namespaces={NS_B: b'{"x":2}'})  # registered once, never overwritten
    assert set(cold.keys_of_namespace(NS_B)) == {K(2), K(3)} and cold.keys_of_namespace(b"z" * 16) == []
    assert cold.namespaces() == {NS_B: {"x": 1}}
    assert cold.session_get(b"t\0s") == b"{}" and cold.session_items() == [(b"t\0s", b"{}")]
    cold.write_batch([], sessions={b"t\0s": None})
    assert cold.session_get(b"t\0s") is None
    assert len(cold.delete_many(cold.keys_of_namespace(NS_B))) == 2
    assert list(cold.keys()) == [K(1)] and cold.ns_of(K(1)) == NS_A
    audit(cold)


def test_damaged_record_is_dropped(cold):
    write(cold, 1)
    rec = bytearray(cold.get_record(K(1)))
    rec[-1] ^= 0xFF
    assert cold.decode(K(1), bytes(rec)) is None
    assert cold.checksum_failures == 1 and not cold.contains(K(1))
    audit(cold)


def test_unusable_path_raises_tier_unavailable(tmp_dir):
    blocker = os.path.join(tmp_dir, "file")
    open(blocker, "w").close()
    with pytest.raises(TierUnavailable, match="cannot open the cold tier"):
        ColdTier(os.path.join(blocker, "cold"), 1 << 20, Codec())
