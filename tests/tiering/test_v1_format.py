"""On-disk compatibility: stores written by the v1 code (``data/make_v1_store.py``) open and serve today.

The fixture files were written once by the code before issue 12 and are checked in; each test works on
a copy of them, so the fixture itself never changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil

import lmdb
import pytest
from tiering_helpers import config

from kvtier.tiering import BlockLayout, Namespace, TieredStore
from kvtier.tiering.codec import checksum
from kvtier.tiering.crypto import RecordSealer, parse_key
from kvtier.tiering.errors import TierUnavailable
from kvtier.tiering.keys import BlockKey

DATA = pathlib.Path(__file__).parent / "data"
EXPECTED = json.loads((DATA / "v1_expected.json").read_text())
SEALED_KEY_HEX = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"  # make_v1_store.py's
FIXTURES = {"plain": ("v1_store", None), "sealed": ("v1_store_sealed", SEALED_KEY_HEX)}


def _copy(name: str, tmp_path: pathlib.Path) -> str:
    dst = tmp_path / name
    shutil.copytree(DATA / name, dst)
    return os.fspath(dst)


def _open(data_dir: str, key_hex: str | None) -> TieredStore:
    sealer = RecordSealer(parse_key(key_hex)) if key_hex else None
    return TieredStore(config(data_dir, hot_capacity=1 << 20, warm_capacity=1 << 20), sealer=sealer)


def _records(data_dir: str) -> dict[str, str]:
    env = lmdb.open(os.path.join(data_dir, "cold"), max_dbs=8, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            db = env.open_db(b"blocks", txn=txn, create=False)
            return {bytes(k).hex(): hashlib.sha256(bytes(v)).hexdigest() for k, v in txn.cursor(db=db)}
    finally:
        env.close()


def test_fixture_is_small():
    total = sum(f.stat().st_size for f in DATA.rglob("*") if f.is_file())
    assert total < 200_000


@pytest.mark.parametrize("kind", sorted(FIXTURES))
def test_every_block_and_session_reads_back_identical(kind, tmp_path):
    name, key_hex = FIXTURES[kind]
    want = EXPECTED[kind]
    data_dir = _copy(name, tmp_path)
    with _open(data_dir, key_hex) as store:
        assert store.check() == []
        for ns in want["namespaces"]:
            assert store.namespace_of(bytes.fromhex(ns["ns_id"])) is not None
        for b in want["blocks"]:
            key = BlockKey.from_hex(b["key"])
            assert store.where(key) == "cold"
            block, tier = store.get(key)
            raw = block.data.cpu().numpy().tobytes()
            assert tier == "cold"
            assert (block.dtype, list(block.shape), block.ns_id.hex()) == (b["dtype"], b["shape"], b["ns_id"])
            assert f"{checksum(raw):016x}" == b["xxh3"] == f"{block.checksum:016x}"
            assert hashlib.sha256(raw).hexdigest() == b["sha256"]
        for sid_hex, rec in want["sessions"].items():
            tenant, session_id = bytes.fromhex(sid_hex).decode().split("\0", 1)
            session = store.get_session(tenant, session_id)
            assert json.loads(session.to_json()) == rec
            assert store.session_count(tenant) >= 1
        for ns in want["namespaces"]:
            dtype, rest = ns["layout"].split(":")
            dims, bt = rest.split("/")
            layers, heads, hd = (int(x) for x in dims.split("x"))
            namespace = Namespace(ns["tenant"], ns["model"], ns["revision"],
                                  BlockLayout(dtype, layers=layers, kv_heads=heads, head_dim=hd, block_tokens=int(bt)))
            assert namespace.ns_id.hex() == ns["ns_id"]
            found = store.lookup(namespace, ns["tokens"])
            assert found.tokens == len(ns["tokens"])
    # serving the store rewrote no record
    assert _records(data_dir) == want["records_sha256"]


def test_sealed_fixture_needs_its_key(tmp_path):
    data_dir = _copy("v1_store_sealed", tmp_path)
    with pytest.raises(TierUnavailable):
        _open(data_dir, None)
