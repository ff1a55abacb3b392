"""Block records of the cold tier: writing, deleting and walking them across the ``blocks``, ``meta``,
``order`` and ``ns_keys`` databases, inside the caller's transaction. Imports ``schema``, ``footprint``.

Every function keeps the four databases, ``used`` and the per-namespace counters in agreement; the
caller owns the transaction (one short one per batch) and its commit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..keys import BlockKey
from .footprint import add_ns_used
from .schema import META, SEQ, U64, USED, read_u64, unpack_meta, write_u64


@dataclass(slots=True)
class ColdWrite:
    """One block to write: its key, its encoded record and its namespace."""

    key: BlockKey
    record: bytes
    ns_id: bytes


def size_of(txn, db: dict, key: BlockKey) -> int:
    """Footprint charged for ``key`` (0 if absent)."""
    meta = txn.get(key.digest, db=db["meta"])
    return 0 if meta is None else unpack_meta(meta)[2]


def ns_of(txn, db: dict, key: BlockKey) -> bytes | None:
    meta = txn.get(key.digest, db=db["meta"])
    return None if meta is None else unpack_meta(meta)[1]


def write_order(txn, db: dict) -> Iterator[BlockKey]:
    """Keys oldest-written first (the ``order`` database), lazily, inside ``txn``."""
    for _seq, kd in txn.cursor(db=db["order"]).iternext():
        yield BlockKey(bytes(kd))


def keys_of_namespace(txn, db: dict, ns_id: bytes) -> list[BlockKey]:
    cur = txn.cursor(db=db["ns_keys"])
    if not cur.set_key(ns_id):
        return []
    return [BlockKey(bytes(v)) for v in cur.iternext_dup(keys=False, values=True)]


def delete(txn, db: dict, key: BlockKey) -> int:
    """Remove one block from every database (``used`` left to the caller); returns its footprint (0 if absent)."""
    meta = txn.get(key.digest, db=db["meta"])
    if meta is None:
        return 0
    seq, ns_id, size = unpack_meta(meta)
    txn.delete(key.digest, db=db["blocks"])
    txn.delete(key.digest, db=db["meta"])
    txn.delete(U64.pack(seq), db=db["order"])
    txn.delete(ns_id, key.digest, db=db["ns_keys"])
    add_ns_used(txn, db["info"], ns_id, -size)
    return size


def delete_many(txn, db: dict, keys: Iterable[BlockKey]) -> list[BlockKey]:
    """Delete blocks and lower ``used`` by their footprints; returns the keys that were there."""
    gone, freed = [], 0
    for key in keys:
        size = delete(txn, db, key)
        if size:
            gone.append(key)
            freed += size
    write_u64(txn, USED, max(read_u64(txn, USED, db["info"]) - freed, 0), db["info"])
    return gone


def write(txn, db: dict, writes: Iterable[tuple[ColdWrite, int]]) -> None:
    """Write ``(record, footprint)`` pairs (replacing any record of the same key), each at the end of
    the write order, updating ``used``, ``seq`` and the namespace counters."""
    info = db["info"]
    used = read_u64(txn, USED, info)
    seq = read_u64(txn, SEQ, info)
    for w, size in writes:
        used -= delete(txn, db, w.key)
        seq += 1
        txn.put(w.key.digest, w.record, db=db["blocks"])
        txn.put(w.key.digest, META.pack(seq, w.ns_id, size), db=db["meta"])
        txn.put(U64.pack(seq), w.key.digest, db=db["order"])
        txn.put(w.ns_id, w.key.digest, db=db["ns_keys"])
        add_ns_used(txn, info, w.ns_id, size)
        used += size
    write_u64(txn, USED, used, info)
    write_u64(txn, SEQ, seq, info)
