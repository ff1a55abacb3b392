"""The cold tier: zstd-compressed block records in LMDB on local disk; LMDB is also its index.

Nothing about cold blocks is held in Python memory: contains/get are B-tree lookups in the memory-
mapped file, so reopening a store of a million blocks costs only opening the file. Named databases
inside the one environment (all updated in the same transactions, so they never disagree):

============  ===========================================  ==========================================
database      key → value                                  purpose
============  ===========================================  ==========================================
``blocks``    key(16) → record (``tiering/codec.py``)      the bytes
``meta``      key(16) → seq(8 BE) ‖ ns_id(16) ‖ size(4)    ``order`` position; size = footprint
``order``     seq(8 BE) → key(16)                          write order, oldest first: eviction order
``ns_keys``   ns_id(16) → key(16), duplicates sorted       invalidate a namespace without a scan
``namespaces`` ns_id(16) → JSON namespace                  invalidate by model fingerprint
``sessions``  tenant ‖ 0 ‖ session id → JSON record        sessions (``tiering/sessions.py``)
``info``      name → value                                 ``used`` bytes, next ``seq``, ``ns:<ns_id>``
                                                           bytes per namespace, encryption key id
============  ===========================================  ==========================================

Encryption at rest (opt-in, ``tiering/crypto.py``): with a :class:`~tiering.crypto.RecordSealer` every
record's payload is sealed with AES-256-GCM bound to its block key; the key's id is stored in ``info``
so that the store cannot be opened without its key, nor with another one.

Eviction is oldest-written first (a block promoted and demoted again is written again only in
write-back mode; in write-through the memory tiers' policies absorb the reads). Writes come in
batches, one short write transaction each; compression happens before the transaction opens.
Thread-safety: any thread may read; writes serialise on LMDB's own writer lock.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import lmdb
import numpy as np
import torch

from .codec import Codec, RecordHeader
from .crypto import RecordSealer, is_sealed
from .errors import CapacityExceeded, ChecksumError, TierUnavailable
from .keys import BlockKey
from .layout import blocks_for
from .tier import Block, Tier

log = logging.getLogger(__name__)

_META = struct.Struct(">Q16sI")
_U64 = struct.Struct(">Q")
#: Share of the LMDB map that records may fill; the rest is B-tree pages and the free list.
FILL_RATIO = 0.80
#: Bytes of the map kept for LMDB itself (meta pages, the roots of the named databases, free list).
RESERVED_BYTES = 128 << 10
#: Bytes a small record costs beyond itself in a leaf page (key, node header, pointer).
KEY_OVERHEAD = 32
#: Bytes of a block's ``meta``, ``order`` and ``ns_keys`` entries, B-tree slack included (measured).
INDEX_OVERHEAD = 256
#: ``info`` keys: per-namespace byte counters (``ns:`` ‖ ns_id), the marker that they are maintained,
#: and the id of the encryption key (absent: records are plain).
_NS_USED = b"ns:"
_NS_USED_MARK = b"ns_used_v1"
_KEY_ID = b"cold_key_id"


@dataclass(slots=True)
class ColdWrite:
    """One block to write: its key, its encoded record and its namespace."""

    key: BlockKey
    record: bytes
    ns_id: bytes


class ColdTier(Tier):
    """LMDB-backed tier.

    :param path: directory of the LMDB environment (created if missing).
    :param capacity: LMDB map size in bytes; records may use :data:`FILL_RATIO` of it, less
        :data:`RESERVED_BYTES`.
    :param codec: encodes/decodes records.
    :param durable_sync: fsync at every commit (True: a committed batch survives power loss; False:
        survives a process crash only).
    :param sealer: encrypt records at rest with this key (see ``tiering/crypto.py``).
    :raises TierUnavailable: if the directory cannot be created, opened or written; if the store is
        encrypted and no sealer (or one with another key) is given; if a sealer is given for a store
        that already holds plain records.
    """

    name = "cold"

    def __init__(self, path: str, capacity: int, codec: Codec, *, durable_sync: bool = True,
                 readonly: bool = False, sealer: RecordSealer | None = None) -> None:
        self.path = path
        self.codec = codec
        self.sealer = sealer
        self._capacity = int(capacity)
        try:
            if not readonly:
                os.makedirs(path, exist_ok=True)
            self.env = lmdb.open(path, map_size=self._capacity, max_dbs=8, subdir=True, readonly=readonly,
                                 sync=durable_sync, metasync=durable_sync, readahead=False, max_readers=512,
                                 lock=not readonly)
            try:
                self._check_file_size()
                self.db = {name: self.env.open_db(name.encode(), dupsort=(name == "ns_keys"), create=not readonly)
                           for name in ("blocks", "meta", "order", "ns_keys", "namespaces", "sessions", "info")}
            except BaseException:
                self.env.close()
                raise
        except (lmdb.InvalidError, lmdb.CorruptedError, lmdb.VersionMismatchError, lmdb.PageNotFoundError) as exc:
            raise TierUnavailable(
                f"the cold tier file {os.path.join(path, 'data.mdb')!r} is damaged or not a kvtier LMDB store "
                f"({exc}). Restore it from a backup, or move the {path!r} directory away to start with an "
                "empty cold tier") from exc
        except (lmdb.Error, OSError) as exc:
            raise TierUnavailable(
                f"cannot open the cold tier at {path!r}: {exc}. Check that the directory exists, is "
                "writable by this user, and holds a kvtier LMDB store (or is empty)") from exc
        self._page = self.env.stat()["psize"]
        self.checksum_failures = 0
        try:
            self._check_key(readonly)
            if not readonly:
                self._count_namespaces()
        except BaseException:
            self.env.close()
            raise

    def _check_file_size(self) -> None:
        """Refuse a truncated ``data.mdb`` before any page beyond its meta pages is touched.

        LMDB memory-maps the file and trusts its meta page: reading a page past the end of a truncated
        file raises SIGBUS and kills the process, at every restart. A healthy file always reaches the
        last page its newest meta page names (pages are written before the meta that names them).

        :raises TierUnavailable: naming the file and what to do.
        """
        data = os.path.join(self.path, "data.mdb")
        size = os.path.getsize(data)
        psize = self.env.stat()["psize"]  # from the meta page: touches no other page
        need = (self.env.info()["last_pgno"] + 1) * psize
        if size < need:
            raise TierUnavailable(
                f"the cold tier file {data!r} is truncated: {size} bytes, but its LMDB header names pages up "
                f"to byte {need} (a damaged disk, a copy cut short, or a full file system). Restore it from a "
                f"backup, or move the {self.path!r} directory away to start with an empty cold tier")

    def _check_key(self, readonly: bool) -> None:
        """Refuse a missing or wrong key for an encrypted store, or a key for a store of plain records."""
        with self.env.begin(db=self.db["info"]) as txn:
            stored = txn.get(_KEY_ID)
        if stored is not None and self.sealer is None and not readonly:
            raise TierUnavailable(
                f"the cold tier at {self.path!r} is encrypted: configure its key (security.cold_key_file "
                "or the KVTIER_COLD_KEY environment variable)")
        if stored is not None and self.sealer is not None and bytes(stored) != self.sealer.key_id:
            raise TierUnavailable(f"the cold tier at {self.path!r} was encrypted with another key")
        if stored is None and self.sealer is not None and not readonly:
            if self.block_count():
                raise TierUnavailable(
                    f"the cold tier at {self.path!r} holds unencrypted blocks; encryption can only be "
                    "switched on for an empty data directory")
            with self.env.begin(write=True, db=self.db["info"]) as txn:
                txn.put(_KEY_ID, self.sealer.key_id)

    def _count_namespaces(self) -> None:
        """Build the per-namespace byte counters once for a store written before they existed."""
        with self.env.begin(write=True) as txn:
            if txn.get(_NS_USED_MARK, db=self.db["info"]) is not None:
                return
            totals: dict[bytes, int] = {}
            for _k, meta in txn.cursor(db=self.db["meta"]):
                _seq, ns_id, size = _META.unpack(meta)
                totals[ns_id] = totals.get(ns_id, 0) + size
            for ns_id, total in totals.items():
                txn.put(_NS_USED + ns_id, _U64.pack(total), db=self.db["info"])
            txn.put(_NS_USED_MARK, b"1", db=self.db["info"])

    # -- reads ----------------------------------------------------------------------------------------
    def contains(self, key: BlockKey) -> bool:
        with self.env.begin(db=self.db["meta"]) as txn:
            return txn.get(key.digest) is not None

    def contains_many(self, keys: Iterable[BlockKey]) -> list[bool]:
        """Membership of several keys in one read transaction."""
        with self.env.begin(db=self.db["meta"]) as txn:
            return [txn.get(k.digest) is not None for k in keys]

    def get_record(self, key: BlockKey) -> bytes | None:
        """The encoded record (one copy out of the map), or ``None``."""
        with self.env.begin(db=self.db["blocks"]) as txn:
            return txn.get(key.digest)

    def encode(self, key: BlockKey, raw, dtype: str, shape: tuple[int, ...], csum: int | None = None) -> bytes:
        """The record to store for a block (``Codec.encode``, then sealed when encryption is on)."""
        record = self.codec.encode(raw, dtype, shape, csum)
        return record if self.sealer is None else self.sealer.seal(key.digest, record)

    def open(self, key: BlockKey, record: bytes) -> tuple[RecordHeader, bytes] | None:
        """The header and the plain record of a record fetched by :meth:`get_record` (unsealed when
        encryption is on), so a caller can size the destination before :meth:`decode`. A damaged one
        (or one that fails authentication) is deleted and gives ``None``."""
        try:
            if self.sealer is not None:
                record = self.sealer.open(key.digest, record)
            elif is_sealed(record):
                raise ChecksumError("record is encrypted and no key is configured")
            return self.codec.read_header(record), record
        except ChecksumError as exc:
            self._drop(key, exc)
            return None

    def decode(self, key: BlockKey, record: bytes, out: np.ndarray | None = None, *,
               opened: bool = False) -> Block | None:
        """Decode a record fetched by :meth:`get_record` (or, with ``opened``, returned by :meth:`open`)
        into a fresh buffer or ``out`` (of exactly the block's size); a damaged one (or, with encryption
        on, one that fails authentication) is deleted and gives ``None``."""
        if not opened:
            got = self.open(key, record)
            if got is None:
                return None
            record = got[1]
        try:
            header, raw = self.codec.decode(record, out)
        except ChecksumError as exc:
            self._drop(key, exc)
            return None
        return self._block(header, raw, self.ns_of(key) or b"")

    def _drop(self, key: BlockKey, exc: ChecksumError) -> None:
        self.checksum_failures += 1
        log.warning("cold tier: block %s failed its check (%s); dropped, it will be a miss", key, exc)
        self.delete(key)

    @staticmethod
    def _block(header: RecordHeader, raw: np.ndarray, ns_id: bytes) -> Block:
        return Block(torch.from_numpy(raw), header.dtype, header.shape, header.checksum, ns_id)

    def get(self, key: BlockKey) -> Block | None:
        record = self.get_record(key)
        return None if record is None else self.decode(key, record)

    def ns_of(self, key: BlockKey) -> bytes | None:
        with self.env.begin(db=self.db["meta"]) as txn:
            meta = txn.get(key.digest)
        return None if meta is None else _META.unpack(meta)[1]

    def keys(self) -> Iterator[BlockKey]:
        with self.env.begin(db=self.db["meta"]) as txn:
            keys = [BlockKey(bytes(k)) for k in txn.cursor().iternext(keys=True, values=False)]
        return iter(keys)

    def keys_of_namespace(self, ns_id: bytes) -> list[BlockKey]:
        with self.env.begin(db=self.db["ns_keys"]) as txn:
            cur = txn.cursor()
            if not cur.set_key(ns_id):
                return []
            return [BlockKey(bytes(v)) for v in cur.iternext_dup(keys=False, values=True)]

    def block_count(self) -> int:
        """Blocks stored (from LMDB's own page statistics: O(1))."""
        with self.env.begin() as txn:
            return txn.stat(self.db["meta"])["entries"]

    # -- writes ---------------------------------------------------------------------------------------
    def put(self, key: BlockKey, block: Block) -> None:
        record = self.encode(key, block.data.cpu().numpy(), block.dtype, block.shape, block.checksum)
        self.write_batch([ColdWrite(key, record, block.ns_id)])

    def write_batch(self, writes: list[ColdWrite], *, sessions: dict[bytes, bytes | None] | None = None,
                    namespaces: dict[bytes, bytes] | None = None,
                    protected: Callable[[BlockKey], bool] = lambda k: False) -> list[BlockKey]:
        """Commit blocks (and session/namespace records) in one transaction, evicting the oldest
        unprotected blocks first if they would not fit.

        :param sessions: session id key → JSON record, or ``None`` to delete that session.
        :param namespaces: ns_id → JSON namespace, registered once.
        :returns: keys evicted to make room.
        :raises CapacityExceeded: if enough room cannot be made; nothing is written then.
        """
        incoming = {w.key for w in writes}
        evicted: list[BlockKey] = []
        batch = sum(self.footprint(len(w.record)) for w in writes)
        for attempt in range(4):
            try:
                with self.env.begin(write=True) as txn:
                    return evicted + self._write(txn, writes, sessions or {}, namespaces or {}, protected)
            except lmdb.MapFullError:
                # Our byte count is an estimate of LMDB's page use, so the map can fill first. Pages
                # freed inside the failing transaction are not reusable by it, so room is made in a
                # transaction of its own, committed, and the write retried.
                log.warning("cold tier: LMDB map full (attempt %d); evicting the oldest blocks", attempt + 1)
                more = self._evict_oldest((2 ** attempt) * max(2 * batch, self._capacity // 16), protected, incoming)
                if not more:
                    break
                evicted += more
        raise CapacityExceeded(f"cold tier at {self.path!r} is full and nothing more can be evicted; "
                               "raise cold.capacity or delete sessions")

    def footprint(self, record_len: int) -> int:
        """Bytes of the map a record of ``record_len`` bytes is charged for (``used_bytes`` counts
        these, so the map does not fill long before the count says so): records too big for a leaf
        page take whole overflow pages (a 4.1 KB record takes two 4 KB pages); smaller ones share
        leaf pages that are about half full; every block also has three index entries."""
        if record_len + KEY_OVERHEAD <= self._page // 2:
            return 2 * (record_len + KEY_OVERHEAD) + INDEX_OVERHEAD
        return blocks_for(record_len + 16, self._page) * self._page + INDEX_OVERHEAD

    def _evict_oldest(self, nbytes: int, protected: Callable[[BlockKey], bool], keep: set[BlockKey]) -> list[BlockKey]:
        """Delete the oldest unprotected blocks worth ``nbytes`` in a committed transaction of their own."""
        try:
            with self.env.begin(write=True) as txn:
                victims, freed = [], 0
                for _seq, kd in txn.cursor(db=self.db["order"]).iternext():
                    key = BlockKey(bytes(kd))
                    if key in keep or protected(key):
                        continue
                    victims.append(key)
                    freed += _META.unpack(txn.get(key.digest, db=self.db["meta"]))[2]
                    if freed >= nbytes:
                        break
                used = _U64.unpack(txn.get(b"used", db=self.db["info"]) or _U64.pack(0))[0]
                for key in victims:
                    used -= self._delete(txn, key)
                txn.put(b"used", _U64.pack(max(used, 0)), db=self.db["info"])
        except lmdb.MapFullError:
            return []
        return victims

    def _write(self, txn, writes, sessions, namespaces, protected) -> list[BlockKey]:
        info = self.db["info"]
        used = _U64.unpack(txn.get(b"used", db=info) or _U64.pack(0))[0]
        seq = _U64.unpack(txn.get(b"seq", db=info) or _U64.pack(0))[0]
        incoming = {}
        for w in writes:
            incoming[w.key] = w
        new_bytes = 0
        for w in incoming.values():
            old = txn.get(w.key.digest, db=self.db["meta"])
            new_bytes += self.footprint(len(w.record)) - (_META.unpack(old)[2] if old else 0)
        evicted: list[BlockKey] = []
        need = used + new_bytes - self.capacity_bytes
        if need > 0:
            cur = txn.cursor(db=self.db["order"])
            for _seq, kd in cur.iternext():
                key = BlockKey(bytes(kd))
                if key in incoming or protected(key):
                    continue
                evicted.append(key)
                meta = txn.get(key.digest, db=self.db["meta"])
                need -= _META.unpack(meta)[2]
                if need <= 0:
                    break
            if need > 0:
                raise CapacityExceeded(f"cold tier full: {need} more bytes needed and every remaining "
                                       "block is pinned or part of this write")
            for key in evicted:
                used -= self._delete(txn, key)
        for w in incoming.values():
            used -= self._delete(txn, w.key)
            seq += 1
            txn.put(w.key.digest, w.record, db=self.db["blocks"])
            txn.put(w.key.digest, _META.pack(seq, w.ns_id, self.footprint(len(w.record))), db=self.db["meta"])
            txn.put(_U64.pack(seq), w.key.digest, db=self.db["order"])
            txn.put(w.ns_id, w.key.digest, db=self.db["ns_keys"])
            self._add_ns_used(txn, w.ns_id, self.footprint(len(w.record)))
            used += self.footprint(len(w.record))
        for ns_id, rec in namespaces.items():
            txn.put(ns_id, rec, db=self.db["namespaces"], overwrite=False)
        for sid, rec in sessions.items():
            if rec is None:
                txn.delete(sid, db=self.db["sessions"])
            else:
                txn.put(sid, rec, db=self.db["sessions"])
        txn.put(b"used", _U64.pack(used), db=info)
        txn.put(b"seq", _U64.pack(seq), db=info)
        return evicted

    def _delete(self, txn, key: BlockKey) -> int:
        """Remove one block from every database; returns the record bytes freed (0 if absent)."""
        meta = txn.get(key.digest, db=self.db["meta"])
        if meta is None:
            return 0
        seq, ns_id, size = _META.unpack(meta)
        txn.delete(key.digest, db=self.db["blocks"])
        txn.delete(key.digest, db=self.db["meta"])
        txn.delete(_U64.pack(seq), db=self.db["order"])
        txn.delete(ns_id, key.digest, db=self.db["ns_keys"])
        self._add_ns_used(txn, ns_id, -size)
        return size

    def _add_ns_used(self, txn, ns_id: bytes, delta: int) -> None:
        name = _NS_USED + ns_id
        total = _U64.unpack(txn.get(name, db=self.db["info"]) or _U64.pack(0))[0] + delta
        if total > 0:
            txn.put(name, _U64.pack(total), db=self.db["info"])
        else:
            txn.delete(name, db=self.db["info"])

    def ns_used_bytes(self, ns_ids: Iterable[bytes]) -> int:
        """Bytes (footprints, as ``used_bytes`` counts them) of the blocks of these namespaces."""
        with self.env.begin(db=self.db["info"]) as txn:
            return sum(_U64.unpack(txn.get(_NS_USED + i) or _U64.pack(0))[0] for i in ns_ids)

    def delete_many(self, keys: Iterable[BlockKey]) -> int:
        """Delete several blocks in one transaction. Returns how many were there."""
        n = 0
        with self.env.begin(write=True) as txn:
            freed = 0
            for key in keys:
                size = self._delete(txn, key)
                freed += size
                n += size > 0
            used = _U64.unpack(txn.get(b"used", db=self.db["info"]) or _U64.pack(0))[0]
            txn.put(b"used", _U64.pack(max(used - freed, 0)), db=self.db["info"])
        return n

    def delete(self, key: BlockKey) -> bool:
        return self.delete_many([key]) > 0

    # -- sessions and namespaces (records owned by tiering/sessions.py) ------------------------------
    def session_get(self, sid: bytes) -> bytes | None:
        with self.env.begin(db=self.db["sessions"]) as txn:
            return txn.get(sid)

    def session_items(self) -> list[tuple[bytes, bytes]]:
        with self.env.begin(db=self.db["sessions"]) as txn:
            return [(bytes(k), bytes(v)) for k, v in txn.cursor().iternext()]

    def session_count(self, prefix: bytes) -> int:
        """Session records whose key starts with ``prefix`` (a tenant's: ``tenant ‖ 0``); O(those)."""
        n = 0
        with self.env.begin(db=self.db["sessions"]) as txn:
            cur = txn.cursor()
            if cur.set_range(prefix):
                for k in cur.iternext(keys=True, values=False):
                    if not bytes(k).startswith(prefix):
                        break
                    n += 1
        return n

    def namespaces(self) -> dict[bytes, dict]:
        with self.env.begin(db=self.db["namespaces"]) as txn:
            return {bytes(k): json.loads(bytes(v)) for k, v in txn.cursor().iternext()}

    # -- accounting -----------------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return max(int(self._capacity * FILL_RATIO) - RESERVED_BYTES, 0)

    @property
    def used_bytes(self) -> int:
        with self.env.begin(db=self.db["info"]) as txn:
            return _U64.unpack(txn.get(b"used") or _U64.pack(0))[0]

    def stored_raw_bytes(self) -> int:
        """Sum of the raw (decoded) lengths of every record: for the compression ratio. O(blocks)."""
        total = 0
        with self.env.begin(db=self.db["blocks"]) as txn:
            for _k, rec in txn.cursor().iternext():
                total += Codec.read_header(rec).raw_length
        return total

    def check(self) -> list[str]:
        """Verify that the indexes agree with each other and with ``used``; returns problems, [] if none.
        O(blocks): for tests and ``kvtier check``, not the data path."""
        with self.env.begin() as txn:
            metas = {bytes(k): _META.unpack(v) for k, v in txn.cursor(db=self.db["meta"])}
            blocks = {bytes(k) for k in txn.cursor(db=self.db["blocks"]).iternext(values=False)}
            order = {bytes(v): _U64.unpack(k)[0] for k, v in txn.cursor(db=self.db["order"])}
            ns_keys = {(bytes(k), bytes(v)) for k, v in txn.cursor(db=self.db["ns_keys"])}
            used = _U64.unpack(txn.get(b"used", db=self.db["info"]) or _U64.pack(0))[0]
            ns_used = {bytes(k)[len(_NS_USED):]: _U64.unpack(v)[0] for k, v in txn.cursor(db=self.db["info"])
                       if bytes(k).startswith(_NS_USED)}
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
        if used > self.capacity_bytes:
            problems.append(f"cold: used {used} over capacity {self.capacity_bytes}")
        return problems

    def sync(self) -> None:
        self.env.sync(True)

    def close(self) -> None:
        self.env.close()

