"""``check()`` must find real damage, and startup verification (``verify_on_start``) must drop it.

Each test damages a closed store the way a disk or an operator would (with lmdb directly, not through
the store), reopens it and asserts the damage is reported: a flipped byte inside a record's payload, a
block a session names deleted, a corrupted byte counter, a record of a key that is not configured."""

from __future__ import annotations

import logging
import os

import lmdb
from tiering_helpers import NS, cold_of, config, payload, tokens_for

from kvtier.tiering import TieredStore
from kvtier.tiering.codec import HEADER
from kvtier.tiering.cold.schema import USED, U64
from kvtier.tiering.crypto import RecordSealer


def _lmdb(data_dir: str):
    return lmdb.open(os.path.join(data_dir, "cold"), max_dbs=8, subdir=True)


def _flip_payload(data_dir: str, key) -> None:
    env = _lmdb(data_dir)
    with env.begin(write=True, db=env.open_db(b"blocks", create=False)) as txn:
        rec = bytearray(txn.get(key.digest))
        rec[(HEADER.size + len(rec)) // 2] ^= 0x5A  # inside the payload: the header still parses
        txn.put(key.digest, bytes(rec))
    env.close()


def _stored(make_store, seq=1, **kw):
    s = make_store(**kw)
    keys = s.put(NS, tokens_for(seq, 3), [payload(seq, i) for i in range(3)], session_id="s", durable=True).keys
    assert s.check() == []
    s.close()
    return keys


def test_flipped_payload_byte_is_reported(make_store, data_dir):
    keys = _stored(make_store)
    _flip_payload(data_dir, keys[1])
    s = make_store()
    problems = s.check()
    # the zstd codecs mostly still decompress a flipped byte and fail the checksum; blosc2 refuses to decompress
    assert len(problems) == 1 and f"block {keys[1]} is damaged" in problems[0]
    assert "checksum" in problems[0] or "does not decompress" in problems[0]
    assert s.where(keys[1]) == "cold"  # check() only reads: the record is still there


def test_block_a_session_names_deleted_is_reported(make_store, data_dir):
    keys = _stored(make_store)
    s = make_store()
    cold_of(s).delete_many([keys[1]])  # consistently from every index: only the session sees the loss
    problems = s.check()
    assert problems == ["cold: session t/s is missing 1 block(s) inside its chain of 3 (lost or deleted, not evicted)"]


def test_evicted_front_of_a_chain_is_not_damage(make_store, data_dir):
    keys = _stored(make_store)
    s = make_store()
    cold_of(s).delete_many([keys[0]])  # what oldest-written eviction does to a chain
    assert s.check() == [] and cold_of(s).walk().partial_sessions == 1


def test_corrupted_byte_counter_is_reported(make_store, data_dir):
    _stored(make_store)
    env = _lmdb(data_dir)
    with env.begin(write=True, db=env.open_db(b"info", create=False)) as txn:
        txn.put(USED, U64.pack(U64.unpack(txn.get(USED))[0] + 4096))
    env.close()
    problems = make_store().check()
    assert len(problems) == 1 and problems[0].startswith("cold: used ") and "sum of block footprints" in problems[0]


def test_sealed_record_damage_and_unknown_key_are_reported(tmp_path):
    data_dir = str(tmp_path)
    a, b = bytes(range(32)), bytes(range(1, 33))
    with TieredStore(config(data_dir), sealer=RecordSealer(a)) as s:
        keys = s.put(NS, tokens_for(1, 3), [payload(1, i) for i in range(3)], durable=True).keys
    _flip_payload(data_dir, keys[2])
    with TieredStore(config(data_dir), sealer=RecordSealer(a)) as s:
        problems = s.check()
        assert len(problems) == 1 and f"block {keys[2]} is damaged" in problems[0] and "authentication" in problems[0]
    with TieredStore(config(data_dir), sealer=RecordSealer({1: b})) as s:  # key 0 removed
        assert any("sealed with key id 0, which is not configured" in p for p in s.check())


def test_verify_on_start_drops_damage_before_it_is_served(make_store, data_dir, caplog):
    keys = _stored(make_store)
    _flip_payload(data_dir, keys[1])
    unverified = make_store()
    assert unverified.where(keys[1]) == "cold" and unverified.stats.tiers["cold"].checksum_failures == 0
    unverified.close()
    with caplog.at_level(logging.INFO, logger="kvtier.tiering.cold.tier"):
        s = make_store(verify_on_start=True)
    assert s.where(keys[1]) is None and s.stats.tiers["cold"].checksum_failures == 1
    assert s.snapshot()["tiers"]["cold"]["checksum_failures"] == 1
    warns = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1 problem(s): 3 records (1 damaged)" in w and "dropped" in w for w in warns)
    assert any(f"block {keys[1]} is damaged" in w for w in warns)
    assert [s.get(k)[0].data.numpy().tobytes() for k in (keys[0], keys[2])] == [payload(1, 0), payload(1, 2)]
    assert s.get(keys[1]) is None
    # what is left: the session's chain has lost its middle block, and check() still says so
    assert s.check() == ["cold: session t/s is missing 1 block(s) inside its chain of 3 (lost or deleted, not evicted)"]


def test_verify_on_start_of_a_clean_store_changes_nothing(make_store, data_dir):
    keys = _stored(make_store)
    s = make_store(verify_on_start=True)
    assert s.stats.tiers["cold"].checksum_failures == 0 and all(s.where(k) == "cold" for k in keys)


def test_a_hole_in_a_write_back_store_is_not_damage(make_store, data_dir):
    # write-back sessions may name blocks that only ever lived in memory, anywhere in the chain
    keys = _stored(make_store, write_policy="write_back")
    s = make_store(write_policy="write_back")
    cold_of(s).delete_many([keys[1]])
    assert s.check() == [] and cold_of(s).walk().partial_sessions == 1
