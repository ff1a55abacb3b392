"""ColdTier: zstd-compressed block records in LMDB on local disk; LMDB is also its index.

Imports lmdb, ``codec``, ``crypto``, the cold schema/records/registry/footprint/opening/verify modules
and the oldest-written policy. Nothing about cold blocks is held in Python memory: contains/get are B-tree
lookups in the memory-mapped file, so reopening a store of a million blocks costs only opening the file.
The databases are described in ``tiering/cold/schema.py``; all are updated in the same transactions.

Encryption at rest (opt-in, ``tiering/crypto.py``): with a :class:`~tiering.crypto.RecordSealer` every
record's payload is sealed with AES-256-GCM bound to its block key; the key's id is stored in ``info``
so that the store cannot be opened without its key, nor with another one.

Eviction is the caller's decision, by :class:`~tiering.policies.OldestWrittenPolicy`: :meth:`put` and
:meth:`write_batch` without ``protected`` raise :class:`CapacityExceeded` when full; with ``protected``
(the write-behind tier's writer passes its pins) the batch's transaction first evicts the oldest
unprotected blocks the policy picks: pick, check they suffice, then delete, in one transaction. Writes
come in batches, one short write transaction each; compression happens before the transaction opens.
Thread-safety: any thread may read; writes serialise on LMDB's own writer lock.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator

import lmdb
import numpy as np
import torch

from ..codec import Codec, RecordHeader
from ..crypto import RecordSealer, UnknownKeyId, is_sealed
from ..errors import CapacityExceeded, ChecksumError, TierUnavailable
from ..keys import BlockKey
from ..policies import OldestWrittenPolicy
from ..spans import TierOps, now_ns
from ..tier import Block, Fetched, Tier
from . import footprint as fp
from . import opening, records, registry, verify
from .records import ColdWrite
from .schema import DATABASES, DUPSORT, USED, read_u64
from .verify import Report

log = logging.getLogger(__name__)


class ColdTier(Tier):
    """LMDB-backed tier.

    :param path: directory of the LMDB environment (created if missing).
    :param capacity: LMDB map size in bytes; records may use :data:`~tiering.cold.footprint.FILL_RATIO`
        of it, less :data:`~tiering.cold.footprint.RESERVED_BYTES`.
    :param codec: encodes/decodes records.
    :param durable_sync: fsync at every commit (True: a committed batch survives power loss; False:
        survives a process crash only).
    :param sealer: encrypt records at rest with this key (see ``tiering/crypto.py``).
    :param sessions_complete: every block a session names is committed with its record or before
        (write-through), so :meth:`check` takes a hole inside a session's chain for damage.
    :raises TierUnavailable: if the directory cannot be created, opened or written; if the store is
        encrypted and no sealer (or one with another key) is given; if a sealer is given for a store
        that already holds plain records.
    """

    name = "cold"
    slow = True
    usage_group = "cold"

    def __init__(self, path: str, capacity: int, codec: Codec, *, durable_sync: bool = True,
                 readonly: bool = False, sealer: RecordSealer | None = None, sessions_complete: bool = True) -> None:
        self.path = path
        self.codec = codec
        self.sealer = sealer
        self.sessions_complete = sessions_complete
        self.policy = OldestWrittenPolicy()
        self._capacity = int(capacity)
        try:
            if not readonly:
                os.makedirs(path, exist_ok=True)
            opening.check_not_empty(path)
            self.env = lmdb.open(path, map_size=self._capacity, max_dbs=8, subdir=True, readonly=readonly,
                                 sync=durable_sync, metasync=durable_sync, readahead=False, max_readers=512,
                                 lock=not readonly)
            try:
                opening.check_file_size(self.env, path)
                self.db = {name: self.env.open_db(name.encode(), dupsort=name in DUPSORT, create=not readonly)
                           for name in DATABASES}
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
        self._unknown_ids_seen: set[int] = set()
        try:
            opening.check_key(self.env, self.db, path, sealer, readonly=readonly, block_count=self.block_count)
            if not readonly:
                with self.env.begin(write=True) as txn:
                    fp.count_namespaces(txn, self.db)
        except BaseException:
            self.env.close()
            raise

    @property
    def encrypted(self) -> bool:
        """Whether records of this store were ever sealed (a key fingerprint is stored)."""
        return bool(opening.fingerprints(self.env, self.db["info"]))

    # -- reads ----------------------------------------------------------------------------------------
    def contains(self, key: BlockKey) -> bool:
        return self.contains_many([key])[0]

    def contains_many(self, keys: Iterable[BlockKey]) -> list[bool]:
        """Membership of several keys in one read transaction."""
        with self.env.begin(db=self.db["meta"]) as txn:
            return [txn.get(k.digest) is not None for k in keys]

    def get_record(self, key: BlockKey) -> bytes | None:  # the encoded record (one copy out of the map) or None
        with self.env.begin(db=self.db["blocks"]) as txn:
            return txn.get(key.digest)

    def encode(self, key: BlockKey, raw, dtype: str, shape: tuple[int, ...], csum: int | None = None, *,
               lossy: str = "") -> bytes:
        """The record to store for a block (``Codec.encode``, lossy codec ``lossy`` if given; sealed if encrypted)."""
        record = self.codec.encode(raw, dtype, shape, csum, lossy)
        return record if self.sealer is None else self.sealer.seal(key.digest, record)

    def open(self, key: BlockKey, record: bytes) -> tuple[RecordHeader, bytes] | None:
        """The header and the plain record of a record fetched by :meth:`get_record` (unsealed when
        encryption is on), so a caller can size the destination before :meth:`decode`. A damaged one
        (or one that fails authentication) is deleted and gives ``None``."""
        try:
            record = self._plain(key, record)
            return self.codec.read_header(record), record
        except (UnknownKeyId, ChecksumError) as exc:
            self._drop(key, exc)
            return None

    def _plain(self, key: BlockKey, record: bytes | memoryview) -> bytes | memoryview:
        """``record`` unsealed (as it is when encryption is off). :raises UnknownKeyId, ChecksumError:"""
        if self.sealer is not None:
            return self.sealer.open(key.digest, record)
        if is_sealed(record):
            raise ChecksumError("record is encrypted and no key is configured")
        return record

    def decode(self, key: BlockKey, record: bytes | memoryview, out: np.ndarray | None = None, *,
               opened: bool = False, ns_id: bytes | None = None) -> Block | None:
        """Decode a record fetched by :meth:`get_record` (or, with ``opened``, returned by :meth:`open`)
        into a fresh buffer or ``out`` (of exactly the block's size); a damaged one (or, with encryption
        on, one that fails authentication) is deleted and gives ``None``. ``ns_id``: the block's, if known."""
        try:
            header, raw = self.codec.decode(record if opened else self._plain(key, record), out)
        except (UnknownKeyId, ChecksumError) as exc:
            self._drop(key, exc)
            return None
        return Block(torch.from_numpy(raw), header.dtype, header.shape, header.checksum,
                     self.ns_of(key) or b"" if ns_id is None else ns_id, header.lossy_codec, header.lossy)

    def _drop(self, key: BlockKey, exc: ChecksumError | UnknownKeyId) -> None:
        """Delete the record of ``key`` that failed to open or decode with ``exc``."""
        if isinstance(exc, UnknownKeyId):  # its key left the key file: unreadable for good, so it goes (a
            # put can store it again); not damage: one WARN per key id, the rest at DEBUG
            level = logging.DEBUG if exc.key_id in self._unknown_ids_seen else logging.WARNING
            self._unknown_ids_seen.add(exc.key_id)
            log.log(level, "cold tier: block %s: %s; dropped (further blocks of key id %d are logged at DEBUG)",
                    key, exc, exc.key_id)
        else:
            self.checksum_failures += 1
            log.warning("cold tier: block %s failed its check (%s); dropped, it will be a miss", key, exc)
        self.delete(key)

    def get(self, key: BlockKey) -> Block | None:
        return (self.read(key) or (None,))[0]

    def read(self, key: BlockKey, ops: TierOps | None = None) -> tuple[Block, str] | None:
        """:meth:`get`, recording ``cold.read`` (LMDB read and decode) and ``codec.decode`` into ``ops``: one
        read transaction, the record decoded where it lies in the map (a damaged one deleted beside it)."""
        t0 = t1 = now_ns() if ops is not None else 0
        block, size = None, 0
        with self.env.begin(buffers=True) as txn:
            record = txn.get(key.digest, db=self.db["blocks"])
            if record is not None:
                size, ns_id = len(record), records.ns_of(txn, self.db, key) or b""
                t1 = now_ns() if ops is not None else 0
                block = self.decode(key, record, ns_id=ns_id)
        if ops is not None:
            t2 = now_ns()
            ops.record("cold.read", t0, t2, nbytes=size, hit=block is not None)
            if size:
                ops.record("codec.decode", t1, t2, nbytes=size, raw_bytes=block.nbytes if block else 0,
                           hit=block is not None)
        return None if block is None else (block, self.name)

    def fetch(self, key: BlockKey, ops: TierOps | None = None) -> Fetched | None:
        """The record opened (read and unsealed, not decoded): :attr:`Fetched.decode_into` decompresses it
        straight into the caller's buffer, checking its checksum there."""
        t0 = now_ns() if ops is not None else 0
        record = self.get_record(key)
        opened = None if record is None else self.open(key, record)
        if ops is not None:
            ops.record("cold.read", t0, now_ns(), nbytes=len(record or b""), hit=opened is not None)
        if opened is None:
            return None
        header, plain = opened
        ns_id = self.ns_of(key) or b""  # once, for the Fetched and its block

        def decode_into(out: np.ndarray, ops: TierOps | None = None) -> Block | None:
            t0 = now_ns() if ops is not None else 0
            block = self.decode(key, plain, out, opened=True, ns_id=ns_id)
            if ops is not None:
                ops.record("codec.decode", t0, now_ns(), nbytes=len(plain), raw_bytes=header.raw_length,
                           hit=block is not None)
            return block

        return Fetched(self.name, header.raw_length, ns_id, decode_into=decode_into, lossy=header.lossy)

    def ns_of(self, key: BlockKey) -> bytes | None:
        with self.env.begin() as txn:
            return records.ns_of(txn, self.db, key)

    def keys(self) -> Iterator[BlockKey]:
        with self.env.begin(db=self.db["meta"]) as txn:
            keys = [BlockKey(bytes(k)) for k in txn.cursor().iternext(keys=True, values=False)]
        return iter(keys)

    def keys_of_namespace(self, ns_id: bytes) -> list[BlockKey]:
        with self.env.begin() as txn:
            return records.keys_of_namespace(txn, self.db, ns_id)

    def block_count(self) -> int:
        """Blocks stored (from LMDB's own page statistics: O(1))."""
        with self.env.begin() as txn:
            return txn.stat(self.db["meta"])["entries"]

    # -- writes ---------------------------------------------------------------------------------------
    def put(self, key: BlockKey, block: Block) -> None:
        """Write one block now. :raises CapacityExceeded: when it does not fit (nothing is evicted)."""
        record = self.encode(key, block.data.cpu().numpy(), block.dtype, block.shape, block.checksum,
                             lossy=block.cold_codec)
        self.write_batch([ColdWrite(key, record, block.ns_id)])

    def write_batch(self, writes: list[ColdWrite], *, sessions: dict[bytes, bytes | None] | None = None,
                    namespaces: dict[bytes, bytes] | None = None,
                    protected: Callable[[BlockKey], bool] | None = None) -> list[BlockKey]:
        """Commit blocks (and session/namespace records) in one transaction.

        :param sessions: session id key → JSON record, or ``None`` to delete that session.
        :param namespaces: ns_id → JSON namespace, registered once.
        :param protected: make room when the blocks would not fit: evict the oldest blocks (by
            :attr:`policy`) for which this is False, in the same transaction. ``None``: never evict.
        :returns: keys evicted to make room.
        :raises CapacityExceeded: if the blocks do not fit and enough room cannot (or may not) be
            made; nothing is written then.
        """
        incoming = {w.key for w in writes}
        evicted: list[BlockKey] = []
        batch = sum(self.footprint(len(w.record)) for w in writes)
        for attempt in range(4):
            try:
                with self.env.begin(write=True) as txn:
                    return evicted + self._write(txn, writes, sessions or {}, namespaces or {}, protected)
            except lmdb.MapFullError:
                if protected is None:
                    break
                # Our byte count is an estimate of LMDB's page use, so the map can fill first. Pages
                # freed inside the failing transaction are not reusable by it, so room is made in a
                # transaction of its own, committed, and the write retried.
                log.warning("cold tier: LMDB map full (attempt %d); evicting the oldest blocks", attempt + 1)
                more = self._evict_committed((2 ** attempt) * max(2 * batch, self._capacity // 16),
                                             lambda k: k in incoming or protected(k))
                if not more:
                    break
                evicted += more
        raise CapacityExceeded(f"cold tier at {self.path!r} is full and nothing more can be evicted; "
                               "raise cold.capacity or delete sessions")

    def footprint(self, record_len: int) -> int:
        """Bytes of the map a record of ``record_len`` bytes is charged for (``tiering/cold/footprint.py``)."""
        return fp.footprint(record_len, self._page)

    def _pick(self, txn, need: int, protected: Callable[[BlockKey], bool]) -> list[BlockKey] | None:
        """The policy's victims for ``need`` bytes, read inside ``txn``."""
        return self.policy.victims(need, records.write_order(txn, self.db),
                                   lambda k: records.size_of(txn, self.db, k), protected)

    def _evict_committed(self, nbytes: int, protected: Callable[[BlockKey], bool]) -> list[BlockKey]:
        """Delete the oldest unprotected blocks worth ``nbytes`` (or all there are) in a committed
        transaction of their own."""
        try:
            with self.env.begin(write=True) as txn:
                victims = self._pick(txn, nbytes, protected)
                if victims is None:  # not enough: take every unprotected one
                    victims = [k for k in records.write_order(txn, self.db) if not protected(k)]
                return records.delete_many(txn, self.db, victims)
        except lmdb.MapFullError:
            return []

    def _write(self, txn, writes: list[ColdWrite], sessions, namespaces, protected) -> list[BlockKey]:
        incoming = {w.key: w for w in writes}
        sized = [(w, self.footprint(len(w.record))) for w in incoming.values()]
        new_bytes = sum(size - records.size_of(txn, self.db, w.key) for w, size in sized)
        need = read_u64(txn, USED, self.db["info"]) + new_bytes - self.capacity_bytes
        evicted: list[BlockKey] = []
        if need > 0:
            victims = None if protected is None else self._pick(txn, need, lambda k: k in incoming or protected(k))
            if victims is None:
                raise CapacityExceeded(f"cold tier full: {need} more bytes needed and every remaining "
                                       "block is pinned or part of this write")
            evicted = records.delete_many(txn, self.db, victims)
        records.write(txn, self.db, sized)
        registry.put_records(txn, self.db, sessions, namespaces)
        return evicted

    def ns_used_bytes(self, ns_ids: Iterable[bytes]) -> int:
        """Bytes (footprints, as ``used_bytes`` counts them) of the blocks of these namespaces."""
        with self.env.begin() as txn:
            return fp.ns_used_bytes(txn, self.db["info"], ns_ids)

    def delete_many(self, keys: Iterable[BlockKey]) -> list[BlockKey]:
        """Delete several blocks in one transaction. Returns those that were there."""
        with self.env.begin(write=True) as txn:
            return records.delete_many(txn, self.db, keys)

    def delete(self, key: BlockKey) -> bool:
        return bool(self.delete_many([key]))

    # -- eviction (Tier contract) -----------------------------------------------------------------------
    def victims(self, nbytes: int, protected: Callable[[BlockKey], bool]) -> list[BlockKey] | None:
        """Oldest-written victims that make room for a block of ``nbytes`` raw bytes, charged its worst
        footprint (:func:`~tiering.cold.footprint.worst_footprint`: it may not compress)."""
        with self.env.begin() as txn:
            need = read_u64(txn, USED, self.db["info"]) + fp.worst_footprint(nbytes, self._page) - self.capacity_bytes
            return self._pick(txn, need, protected)

    def evict(self, keys: list[BlockKey]) -> list[tuple[BlockKey, Block | None]]:
        return [(k, None) for k in self.delete_many(keys)]

    # -- sessions and namespaces (records owned by tiering/sessions.py) ------------------------------
    def session_get(self, sid: bytes) -> bytes | None:
        with self.env.begin() as txn:
            return registry.session_get(txn, self.db, sid)

    def session_items(self) -> list[tuple[bytes, bytes]]:
        with self.env.begin() as txn:
            return registry.session_items(txn, self.db)

    def session_census(self, prefix: bytes, sids: list[bytes]) -> tuple[int, list[bool]]:
        """Session records whose key starts with ``prefix`` (a tenant's: ``tenant ‖ 0``; O(those)), and
        whether each of ``sids`` has one, read in one transaction (so a commit cannot fall between)."""
        with self.env.begin() as txn:
            return (registry.session_count(txn, self.db, prefix),
                    [registry.session_get(txn, self.db, sid) is not None for sid in sids])

    def namespaces(self) -> dict[bytes, dict]:
        with self.env.begin() as txn:
            return registry.namespaces(txn, self.db)

    # -- accounting -----------------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return fp.record_capacity(self._capacity)

    @property
    def used_bytes(self) -> int:
        with self.env.begin() as txn:
            return read_u64(txn, USED, self.db["info"])

    def stored_raw_bytes(self) -> int:
        """Sum of the raw (decoded) lengths of every record: for the compression ratio. O(blocks)."""
        with self.env.begin() as txn:
            return fp.stored_raw_bytes(txn, self.db)

    def check(self) -> list[str]:
        """Verify every record (decoded against its checksum, opened when sealed), every session's chain,
        the namespaces, the indexes and ``used`` (``tiering/cold/verify.py``); returns problems, [] if
        none. Read-only. O(stored bytes): for tests and ``kvtier check``, not the data path."""
        return self.walk().problems

    def walk(self, progress: Callable[[int, int], None] | None = None) -> Report:
        """The full verification report (``tiering/cold/verify.py``), in one read transaction."""
        with self.env.begin() as txn:
            return verify.walk(txn, self.db, self.codec, self.sealer, self.capacity_bytes,
                               sessions_complete=self.sessions_complete, progress=progress)

    def verify(self) -> Report:
        """Startup verification: :meth:`walk`, logging progress on large stores, then delete the damaged
        records (so they are misses, never served) and count them in :attr:`checksum_failures`; one
        WARN line for the damage and one per damaged record (at most 20). Call it before any writer runs."""
        started = time.monotonic()
        last = [started]

        def progress(done: int, total: int) -> None:
            if time.monotonic() - last[0] >= 5.0:
                last[0] = time.monotonic()
                log.info("cold tier: verifying records, %d of %d done", done, total)

        report = self.walk(progress)
        if report.damaged:
            self.delete_many([key for key, _why in report.damaged])
            self.checksum_failures += len(report.damaged)
        level = logging.WARNING if report.problems else logging.INFO
        log.log(level, "cold tier verified in %.1f s: %s%s", time.monotonic() - started, report.summary(),
                "; damaged records dropped (they are misses)" if report.damaged else "")
        for line in report.problems[:20]:
            log.warning("cold tier verification: %s", line)
        return report

    def sync(self) -> None:
        self.env.sync(True)

    def close(self) -> None:
        self.env.close()
