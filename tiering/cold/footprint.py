"""Footprint accounting of the cold tier: what a record costs of the LMDB map, per-namespace byte
counters, and the consistency check of every index. Imports ``schema``, ``codec`` and ``layout``.

The ``used`` count is an estimate of LMDB's page use (it must not say "room left" long after the map
is full), so every record is charged its footprint, not its length.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..codec import Codec
from ..layout import blocks_for
from .schema import NS_USED, NS_USED_MARK, USED, read_u64, unpack_meta, write_u64

#: Share of the LMDB map that records may fill; the rest is B-tree pages and the free list.
FILL_RATIO = 0.80
#: Bytes of the map kept for LMDB itself (meta pages, the roots of the named databases, free list).
RESERVED_BYTES = 128 << 10
#: Bytes a small record costs beyond itself in a leaf page (key, node header, pointer).
KEY_OVERHEAD = 32
#: Bytes of a block's ``meta``, ``order`` and ``ns_keys`` entries, B-tree slack included (measured).
INDEX_OVERHEAD = 256
#: Bytes a record may exceed its raw block by, at worst (incompressible bytes): header, zstd frame,
#: AES-GCM nonce and tag.
RECORD_SLACK = 128


def footprint(record_len: int, page: int) -> int:
    """Bytes of the map a record of ``record_len`` bytes is charged for (``used_bytes`` counts
    these, so the map does not fill long before the count says so): records too big for a leaf
    page take whole overflow pages (a 4.1 KB record takes two 4 KB pages); smaller ones share
    leaf pages that are about half full; every block also has three index entries."""
    if record_len + KEY_OVERHEAD <= page // 2:
        return 2 * (record_len + KEY_OVERHEAD) + INDEX_OVERHEAD
    return blocks_for(record_len + 16, page) * page + INDEX_OVERHEAD


def worst_footprint(raw_bytes: int, page: int) -> int:
    """The footprint a block of ``raw_bytes`` raw bytes may be charged at most (it did not compress)."""
    return footprint(raw_bytes + RECORD_SLACK, page)


def record_capacity(map_size: int) -> int:
    """Bytes of footprints a map of ``map_size`` bytes may hold."""
    return max(int(map_size * FILL_RATIO) - RESERVED_BYTES, 0)


def add_ns_used(txn, info, ns_id: bytes, delta: int) -> None:
    """Add ``delta`` to the byte counter of ``ns_id`` (dropped at 0), inside the caller's transaction."""
    total = read_u64(txn, NS_USED + ns_id, info) + delta
    if total > 0:
        write_u64(txn, NS_USED + ns_id, total, info)
    else:
        txn.delete(NS_USED + ns_id, db=info)


def ns_used_bytes(txn, info, ns_ids: Iterable[bytes]) -> int:
    return sum(read_u64(txn, NS_USED + i, info) for i in ns_ids)


def count_namespaces(txn, db: dict) -> None:
    """Build the per-namespace byte counters once for a store written before they existed."""
    if txn.get(NS_USED_MARK, db=db["info"]) is not None:
        return
    totals: dict[bytes, int] = {}
    for _k, meta in txn.cursor(db=db["meta"]):
        _seq, ns_id, size = unpack_meta(meta)
        totals[ns_id] = totals.get(ns_id, 0) + size
    for ns_id, total in totals.items():
        write_u64(txn, NS_USED + ns_id, total, db["info"])
    txn.put(NS_USED_MARK, b"1", db=db["info"])


def stored_raw_bytes(txn, db: dict) -> int:
    """Sum of the raw (decoded) lengths of every record: for the compression ratio. O(blocks)."""
    return sum(Codec.read_header(rec).raw_length for _k, rec in txn.cursor(db=db["blocks"]).iternext())


def check(txn, db: dict, capacity: int) -> list[str]:
    """Problems found between the indexes, ``used`` and the per-namespace counters; [] if none. O(blocks)."""
    metas = {bytes(k): unpack_meta(v) for k, v in txn.cursor(db=db["meta"])}
    blocks = {bytes(k) for k in txn.cursor(db=db["blocks"]).iternext(values=False)}
    order = {bytes(v): int.from_bytes(k, "big") for k, v in txn.cursor(db=db["order"])}
    ns_keys = {(bytes(k), bytes(v)) for k, v in txn.cursor(db=db["ns_keys"])}
    used = read_u64(txn, USED, db["info"])
    ns_used = {bytes(k)[len(NS_USED):]: int.from_bytes(v, "big") for k, v in txn.cursor(db=db["info"])
               if bytes(k).startswith(NS_USED)}
    problems = []
    per_ns: dict[bytes, int] = {}
    for m in metas.values():
        per_ns[m[1]] = per_ns.get(m[1], 0) + m[2]
    if ns_used != per_ns:
        problems.append("cold: per-namespace byte counters disagree with meta")
    if set(metas) != blocks or set(metas) != set(order):
        problems.append(f"cold: {len(metas)} meta, {len(blocks)} records, {len(order)} order entries disagree")
    if any(order.get(k) != m[0] for k, m in metas.items()):
        problems.append("cold: order and meta disagree on write sequence")
    if ns_keys != {(m[1], k) for k, m in metas.items()}:
        problems.append("cold: ns_keys index disagrees with meta")
    if used != sum(m[2] for m in metas.values()):
        problems.append(f"cold: used {used} != sum of block footprints {sum(m[2] for m in metas.values())}")
    if used > capacity:
        problems.append(f"cold: used {used} over capacity {capacity}")
    return problems
