"""Encryption at rest of the cold tier (``tiering/crypto.py``): round trip, tamper and swap
detection (a miss and a checksum failure, never wrong bytes), and the key checks at open."""

from __future__ import annotations

import base64
import os

import numpy as np
import pytest
from tiering_helpers import cold_of

from kvtier.tiering import BlockLayout, Namespace, StoreConfig, TieredStore
from kvtier.tiering.cold import ColdTier
from kvtier.tiering.codec import HEADER, Codec
from kvtier.tiering.crypto import FLAG_SEALED, FLAGS_OFFSET, RecordSealer, load_keys, parse_key
from kvtier.tiering.errors import TierUnavailable

KEY = bytes(range(32))
NS = Namespace("t", "enc/model", "r1", BlockLayout("float16", 2, 2, 32, 16))
PLAIN_MARK = b"\x11\x22\x33\x44\x55\x66\x77\x88" * 4


def cfg(tmp_path) -> StoreConfig:
    # cold only: every get decodes a record
    return StoreConfig(data_dir=str(tmp_path), hot_device="off", warm_capacity=0, durable_sync=False)


def payloads(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    size = NS.layout.block_bytes(16)
    return [PLAIN_MARK + rng.integers(0, 256, size - len(PLAIN_MARK), dtype=np.uint8).tobytes() for _ in range(n)]


def put(store, n=3):
    data = payloads(n)
    res = store.put(NS, list(range(16 * n)), data, durable=True)
    return res.keys, data


def test_round_trip_and_payload_is_not_on_disk(tmp_path):
    with TieredStore(cfg(tmp_path), sealer=RecordSealer(KEY)) as store:
        keys, data = put(store)
        assert [bytes(store.get(k)[0].data.numpy()) for k in keys] == data
        record = cold_of(store).get_record(keys[0])
        assert record[FLAGS_OFFSET] & FLAG_SEALED and Codec.read_header(record).raw_length == len(data[0])
        assert store.check() == []
    with open(tmp_path / "cold" / "data.mdb", "rb") as fh:
        assert PLAIN_MARK not in fh.read()


def test_plain_store_keeps_payload_readable_on_disk(tmp_path):
    # the control for the test above: without a key the marker is there (codec raw)
    config = cfg(tmp_path)
    config.codec = "raw"
    with TieredStore(config) as store:
        put(store)
    with open(tmp_path / "cold" / "data.mdb", "rb") as fh:
        assert PLAIN_MARK in fh.read()


def _edit(store, key, fn):
    cold = cold_of(store)
    with cold.env.begin(write=True, db=cold.db["blocks"]) as txn:
        txn.put(key.digest, fn(bytes(txn.get(key.digest))))


@pytest.mark.parametrize("where", ["payload", "header", "tag"])
def test_tampered_record_is_a_miss_and_a_checksum_failure(tmp_path, where):
    with TieredStore(cfg(tmp_path), sealer=RecordSealer(KEY)) as store:
        keys, _ = put(store)
        offset = {"payload": HEADER.size + 40, "header": 8, "tag": -1}[where]

        def flip(rec):
            rec = bytearray(rec)
            rec[offset] ^= 0x01
            return bytes(rec)

        _edit(store, keys[1], flip)
        assert store.get(keys[1]) is None
        assert store.snapshot()["tiers"]["cold"]["checksum_failures"] == 1
        assert store.get(keys[0]) is not None and store.check() == []


def test_record_moved_to_another_key_fails(tmp_path):
    with TieredStore(cfg(tmp_path), sealer=RecordSealer(KEY)) as store:
        keys, data = put(store)
        other = cold_of(store).get_record(keys[2])
        _edit(store, keys[0], lambda _rec: other)  # a valid record, of another block
        assert store.get(keys[0]) is None
        assert bytes(store.get(keys[2])[0].data.numpy()) == data[2]


def test_plain_record_injected_into_an_encrypted_store_is_rejected(tmp_path):
    with TieredStore(cfg(tmp_path), sealer=RecordSealer(KEY)) as store:
        keys, data = put(store)
        plain = Codec().encode(data[0], "float16", NS.layout.shape(16))
        _edit(store, keys[0], lambda _rec: plain)
        assert store.get(keys[0]) is None


def test_open_without_key_or_with_another_key_fails_clearly(tmp_path):
    with TieredStore(cfg(tmp_path), sealer=RecordSealer(KEY)) as store:
        put(store)
    with pytest.raises(TierUnavailable, match="encrypted: configure its key"):
        TieredStore(cfg(tmp_path))
    with pytest.raises(TierUnavailable, match="another key"):
        TieredStore(cfg(tmp_path), sealer=RecordSealer(bytes(32)))
    with TieredStore(cfg(tmp_path), sealer=RecordSealer(KEY)) as store:  # the lock was released each time
        assert store.lookup(NS, list(range(48))).blocks == 3


def test_key_for_a_store_of_plain_blocks_is_refused(tmp_path):
    with TieredStore(cfg(tmp_path)) as store:
        put(store)
    with pytest.raises(TierUnavailable, match="unencrypted blocks"):
        TieredStore(cfg(tmp_path), sealer=RecordSealer(KEY))


def test_readonly_inspection_still_reads_headers(tmp_path):
    with TieredStore(cfg(tmp_path), sealer=RecordSealer(KEY)) as store:
        put(store)
    cold = ColdTier(str(tmp_path / "cold"), 64 << 20, Codec(), readonly=True)
    try:
        assert cold.block_count() == 3 and cold.stored_raw_bytes() == 3 * NS.layout.block_bytes(16)
    finally:
        cold.close()


def test_key_parsing(tmp_path):
    assert parse_key(KEY.hex()) == parse_key(base64.b64encode(KEY).decode() + "\n") == KEY
    for bad in ("00" * 31, "not a key", base64.b64encode(bytes(16)).decode()):
        with pytest.raises(ValueError) as err:
            parse_key(bad)
        assert bad not in str(err.value)
    f = tmp_path / "k"
    f.write_text(KEY.hex())
    assert load_keys(f, env={}) == {0: KEY}
    assert load_keys(None, env={"KVTIER_COLD_KEY": base64.b64encode(KEY).decode()}) == {0: KEY}
    assert load_keys(None, env={}) is None
    assert KEY.hex() not in repr(RecordSealer(KEY))


def test_nonces_differ_between_records(tmp_path):
    sealer = RecordSealer(os.urandom(32))
    rec = Codec().encode(payloads(1)[0], "float16", NS.layout.shape(16))
    a, b = sealer.seal(b"k" * 16, rec), sealer.seal(b"k" * 16, rec)
    assert a != b and sealer.open(b"k" * 16, a) == sealer.open(b"k" * 16, b) == rec
