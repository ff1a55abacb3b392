"""Pinned writer of the v1 on-disk fixture: a small LMDB cold store plus the JSON of what it holds.

Run once, with the code of commit d92fedc (the format before issue 12), from the worktree root:
``.venv/bin/python tests/tiering/data/make_v1_store.py``. It writes ``v1_store/`` (plain records) and
``v1_store_sealed/`` (AES-GCM records, key :data:`SEALED_KEY_HEX`), compacted, and ``v1_expected.json``.
``tests/tiering/test_v1_format.py`` opens copies of them with today's code. Never re-run it on newer code:
the point is that the files were written by the old one.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile

import lmdb
import numpy as np

from kvtier.tiering import BlockLayout, Namespace, StoreConfig, TieredStore
from kvtier.tiering.codec import checksum
from kvtier.tiering.crypto import RecordSealer, parse_key
from kvtier.tiering.keys import chain_keys

HERE = pathlib.Path(__file__).parent
#: Test-only key of the sealed fixture (never a real secret).
SEALED_KEY_HEX = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
#: A TTL long enough that the fixture's session never expires in a test run (about 30 years).
TTL_S = 1e9
NAMESPACES = [
    # (tenant, model, revision, layout, tokens, session id or None)
    ("acme", "llama", "r1", BlockLayout("float16", layers=2, kv_heads=1, head_dim=4, block_tokens=4), 10, "chat-1"),
    ("acme", "qwen", "r2", BlockLayout("bfloat16", layers=1, kv_heads=2, head_dim=4, block_tokens=4), 8, None),
    ("beta", "phi", "main", BlockLayout("float32", layers=1, kv_heads=1, head_dim=8, block_tokens=2), 5, "s/2"),
]


def _blocks(rng: np.random.Generator, lay: BlockLayout, n_tokens: int) -> list[bytes]:
    out = []
    for start in range(0, n_tokens, lay.block_tokens):
        tokens = min(lay.block_tokens, n_tokens - start)
        out.append(rng.integers(0, 256, lay.block_bytes(tokens), dtype=np.uint8).tobytes())
    return out


def _write(data_dir: str, sealer: RecordSealer | None, rng: np.random.Generator, names) -> dict:
    cfg = StoreConfig(data_dir=data_dir, hot_device="off", warm_capacity=0, cold_capacity=8 << 20,
                      durable_sync=False, compress_threads=1, prefetch_threads=1, maintenance_s=3600)
    expected = {"blocks": [], "sessions": {}, "namespaces": []}
    with TieredStore(cfg, sealer=sealer) as store:
        for tenant, model, rev, lay, n_tokens, sid in names:
            ns = Namespace(tenant, model, rev, lay)
            tokens = [int(t) for t in rng.integers(0, 50_000, n_tokens)]
            blocks = _blocks(rng, lay, n_tokens)
            store.put(ns, tokens, blocks, session_id=sid, durable=True, ttl_s=TTL_S if sid else None)
            keys = chain_keys(ns, tokens)
            expected["namespaces"].append({"tenant": tenant, "model": model, "revision": rev,
                                           "layout": lay.describe(), "ns_id": ns.ns_id.hex(), "tokens": tokens})
            for i, (key, raw) in enumerate(zip(keys, blocks)):
                expected["blocks"].append({
                    "key": key.hex(), "ns_id": ns.ns_id.hex(), "dtype": lay.dtype,
                    "shape": list(lay.shape(len(raw) // lay.block_bytes(1))), "xxh3": f"{checksum(raw):016x}",
                    "sha256": hashlib.sha256(raw).hexdigest(), "partial": len(raw) < lay.block_bytes()})
        store.flush()
        for s in store.sessions():
            expected["sessions"][s.id_key.hex()] = json.loads(s.to_json())
    # read after close: LMDB refuses a second handle on one file in one process
    env = lmdb.open(os.path.join(data_dir, "cold"), max_dbs=8, readonly=True, lock=False)
    with env.begin() as txn:
        db = env.open_db(b"blocks", txn=txn, create=False)
        expected["records_sha256"] = {bytes(k).hex(): hashlib.sha256(bytes(v)).hexdigest()
                                      for k, v in txn.cursor(db=db)}
    env.close()
    return expected


def _compact(src_dir: str, dst: pathlib.Path) -> None:
    """Copy the store's LMDB file compacted (free pages dropped) into ``dst/cold/data.mdb``."""
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "cold").mkdir(parents=True)
    env = lmdb.open(os.path.join(src_dir, "cold"), max_dbs=8, readonly=True, lock=False)
    env.copy(str(dst / "cold"), compact=True)
    env.close()


def main() -> None:
    rng = np.random.default_rng(20261202)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        out["plain"] = _write(os.path.join(tmp, "plain"), None, rng, NAMESPACES)
        _compact(os.path.join(tmp, "plain"), HERE / "v1_store")
        sealer = RecordSealer(parse_key(SEALED_KEY_HEX))
        out["sealed"] = _write(os.path.join(tmp, "sealed"), sealer, rng, NAMESPACES[:1])
        _compact(os.path.join(tmp, "sealed"), HERE / "v1_store_sealed")
    (HERE / "v1_expected.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
