"""``kvtier check DATA_DIR`` (offline verification; exit 0 clean, 1 damage, 2 could not open) and the
explicit refusal of a 0-byte ``data.mdb`` by ``kvtier check`` and ``kvtier serve``."""

from __future__ import annotations

import os
import subprocess
import sys

import lmdb

from kvtier.tiering import BlockLayout, Namespace, StoreConfig, TieredStore
from kvtier.tiering.codec import HEADER
from kvtier.tiering.crypto import RecordSealer
from tests.fixtures.server import ROOT

NS = Namespace("t", "check/model", "r1", BlockLayout("float16", 1, 1, 4, 4))
KEY = bytes(range(32))


def _kvtier(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def _store(data_dir, sealer=None) -> list:
    cfg = StoreConfig(data_dir=str(data_dir), hot_device="off", warm_capacity=0, cold_capacity=8 << 20,
                      durable_sync=False)
    with TieredStore(cfg, sealer=sealer) as s:
        blocks = [bytes([i]) * 8 + os.urandom(NS.layout.block_bytes() - 8) for i in range(3)]
        return s.put(NS, list(range(12)), blocks, session_id="s", durable=True).keys


def _flip(data_dir, key) -> None:
    env = lmdb.open(os.path.join(data_dir, "cold"), max_dbs=8, subdir=True)
    with env.begin(write=True, db=env.open_db(b"blocks", create=False)) as txn:
        rec = bytearray(txn.get(key.digest))
        rec[HEADER.size + 2] ^= 0xFF
        txn.put(key.digest, bytes(rec))
    env.close()


def test_check_clean_then_damaged(tmp_path):
    keys = _store(tmp_path)
    done = _kvtier("check", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{tmp_path}: clean: 3 records (0 damaged), 1 sessions (0 partly evicted), "
                                        "1 namespaces"]
    _flip(tmp_path, keys[1])
    done = _kvtier("check", str(tmp_path))
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"{tmp_path}: 1 problem(s): 3 records (1 damaged)")
    assert len(lines) == 2 and f"block {keys[1]} is damaged" in lines[1]
    done = _kvtier("check", str(tmp_path))  # read-only: the damage is still there to be found
    assert done.returncode == 1


def test_check_of_an_encrypted_store_needs_its_key(tmp_path):
    _store(tmp_path / "d", RecordSealer(KEY))
    done = _kvtier("check", str(tmp_path / "d"), env={"KVTIER_COLD_KEY": ""})
    assert done.returncode == 2 and "is encrypted: give its key" in done.stderr
    (tmp_path / "k").write_text(KEY.hex())
    done = _kvtier("check", str(tmp_path / "d"), "--cold-key-file", str(tmp_path / "k"))
    assert done.returncode == 0 and ": clean: 3 records" in done.stdout, done.stderr
    (tmp_path / "k").write_text(bytes(32).hex())
    done = _kvtier("check", str(tmp_path / "d"), "--cold-key-file", str(tmp_path / "k"))
    assert done.returncode == 2 and "another key" in done.stderr


def test_check_of_no_store_is_exit_2(tmp_path):
    done = _kvtier("check", str(tmp_path / "missing"))
    assert done.returncode == 2 and "no kvtier store" in done.stderr and len(done.stderr.splitlines()) == 1


def test_zero_byte_data_file_is_refused_by_check_and_serve(tmp_path):
    _store(tmp_path)
    data = tmp_path / "cold" / "data.mdb"
    data.write_bytes(b"")
    done = _kvtier("check", str(tmp_path))
    assert done.returncode == 2 and str(data) in done.stderr and "empty (0 bytes)" in done.stderr
    done = _kvtier("serve", "--data-dir", str(tmp_path), "--port", "0", "--hot-device", "off",
                   "--metrics-port", "0")
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("kvtier: could not start: ") and str(data) in last and "empty (0 bytes)" in last
    assert "Restore it from a backup, or delete it" in last
    assert data.stat().st_size == 0  # nothing was written over it


def test_serve_verify_on_start_drops_damage_and_says_so(tmp_path):
    from kvtier.service.client.client import KVTierClient
    from tests.fixtures.server import KVTierProcess

    keys = _store(tmp_path / "data")
    _flip(tmp_path / "data", keys[1])
    proc = KVTierProcess(tmp_path, data_dir=tmp_path / "data", args=("--verify-on-start",)).start()
    try:
        with KVTierClient(proc.target, data_path="grpc", timeout=10) as kv:
            cold = [t for t in kv.stats().tiers if t.tier == "cold"]
            assert cold[0].checksum_failures == 1 and cold[0].blocks == 2
        assert proc.stop() == 0
    finally:
        proc.kill()
    log = proc.log_text()
    assert "WARNING" in log and "cold tier verified" in log and "1 damaged" in log and str(keys[1]) in log
