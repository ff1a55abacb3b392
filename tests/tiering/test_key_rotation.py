"""Cold-key rotation (``tiering/crypto.py``): the key id in a sealed record's header, several keys in
the key file (the first seals, every one opens its id's records), and what removing a key means."""

from __future__ import annotations

import logging

import pytest
from tiering_helpers import cold_of

from kvtier.tiering import BlockLayout, Namespace, StoreConfig, TieredStore
from kvtier.tiering.crypto import FLAG_SEALED, FLAGS_OFFSET, RecordSealer, key_id_of, load_keys, parse_keyring
from kvtier.tiering.errors import TierUnavailable

A, B = bytes(range(32)), bytes(range(100, 132))
NS = Namespace("t", "rot/model", "r1", BlockLayout("float16", 2, 2, 32, 16))


def cfg(tmp_path) -> StoreConfig:
    return StoreConfig(data_dir=str(tmp_path), hot_device="off", warm_capacity=0, durable_sync=False)


def put(store, seq: int):
    size = NS.layout.block_bytes(16)
    data = [bytes([seq, i]) * (size // 2) for i in range(2)]
    return store.put(NS, [seq * 1000 + t for t in range(32)], data, durable=True).keys, data


def read(store, key) -> bytes | None:
    got = store.get(key)
    return None if got is None else bytes(got[0].data.numpy())


def key_file(tmp_path, *lines: str):
    path = tmp_path / "cold.key"
    path.write_text("\n".join(lines) + "\n")
    return load_keys(path, env={})


def test_rotation_keeps_old_records_readable_and_removal_makes_them_misses(tmp_path, caplog):
    data_dir = tmp_path / "data"
    single = key_file(tmp_path, A.hex())  # a key file as it was before rotation: one bare key, id 0
    with TieredStore(cfg(data_dir), sealer=RecordSealer(single)) as store:
        old_keys, old_data = put(store, 1)
        assert key_id_of(cold_of(store).get_record(old_keys[0])) == 0
    rotated = key_file(tmp_path, f"1:{B.hex()}", f"0:{A.hex()}")  # B seals from now on, A still opens
    with TieredStore(cfg(data_dir), sealer=RecordSealer(rotated)) as store:
        new_keys, new_data = put(store, 2)
        record = cold_of(store).get_record(new_keys[0])
        assert record[FLAGS_OFFSET] & FLAG_SEALED and key_id_of(record) == 1
    with TieredStore(cfg(data_dir), sealer=RecordSealer(rotated)) as store:  # restart: both read
        assert [read(store, k) for k in old_keys + new_keys] == old_data + new_data
        assert store.check() == []
    only_b = key_file(tmp_path, f"1:{B.hex()}")  # A removed
    with caplog.at_level(logging.WARNING, logger="kvtier.tiering.cold.tier"):
        with TieredStore(cfg(data_dir), sealer=RecordSealer(only_b)) as store:
            assert [read(store, k) for k in new_keys] == new_data
            assert [read(store, k) for k in old_keys] == [None, None]
            assert store.snapshot()["tiers"]["cold"]["checksum_failures"] == 0  # not damage
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "key id 0" in warned[0] and A.hex() not in warned[0]


def test_the_same_id_with_another_key_is_refused(tmp_path):
    with TieredStore(cfg(tmp_path), sealer=RecordSealer({1: B, 0: A})) as store:
        put(store, 1)
    with pytest.raises(TierUnavailable, match="another key under key id 1"):
        TieredStore(cfg(tmp_path), sealer=RecordSealer({1: A}))
    with pytest.raises(TierUnavailable, match="encrypted: configure its key"):
        TieredStore(cfg(tmp_path))


def test_keyring_parsing(tmp_path):
    assert parse_keyring(f"# rotated\n3:{B.hex()}\n\n{A.hex()}\n") == {3: B, 0: A}
    assert list(parse_keyring(f"3:{B.hex()}\n0:{A.hex()}")) == [3, 0]  # order kept: the first seals
    for bad in (f"128:{A.hex()}", f"1:{A.hex()}\n1:{B.hex()}", "1:nothex", "", "# only a comment"):
        with pytest.raises(ValueError) as err:
            parse_keyring(bad)
        assert A.hex() not in str(err.value) and B.hex() not in str(err.value)
