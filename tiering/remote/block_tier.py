"""RemoteBlockTier: the remote tier as one entry of the tier list's ``below`` part, with the session records it shares.

Imports torch, tiering's tier, codec, crypto, errors, keys and spans, and this package's RemoteTier.
A remote record carries no namespace id, so the tier answers a read only for a key it was told the
namespace of (:meth:`learn`: from a shared session record, or a lookup under a namespace the keys were
chained from); any other remote hit is a miss, so a block can never reach a tenant that cannot own it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

import torch

from ..codec import Codec
from ..crypto import RecordSealer
from ..errors import ChecksumError
from ..keys import BlockKey
from ..spans import TierOps, now_ns
from ..tier import Block, Tier
from .remote_tier import RemoteTier
from .results import PutResult, WriteOutcome

#: keys whose namespace the tier remembers at most (oldest forgotten first; ~150 B each)
HINTS = 1 << 18


class RemoteBlockTier(Tier):
    """A :class:`~tiering.tier.Tier` over a :class:`RemoteTier` (``slow``: its reads are network I/O).

    Never evicts and holds no local bytes (capacity and usage 0); :meth:`keys` is empty (a cluster is
    not walked). Thread-safe. :param codec: decodes records (the cold tier's format).
    :param sealer: the cold tier's sealer when encryption at rest is on.
    """

    name = "remote"
    slow = True
    usage_group = "remote"

    def __init__(self, remote: RemoteTier, codec: Codec, *, sealer: RecordSealer | None = None) -> None:
        self.remote = remote
        self.codec = codec
        self.sealer = sealer
        self._lock = threading.Lock()
        self._hints: OrderedDict[BlockKey, bytes] = OrderedDict()
        self._decode_failures = 0

    @property
    def write_mode(self) -> str:
        return self.remote.config.write

    # -- namespaces of remote keys --------------------------------------------------------------------
    def learn(self, keys: Iterable[BlockKey], ns_id: bytes) -> None:
        """Remember that ``keys`` belong to namespace ``ns_id`` (a key already known keeps its namespace)."""
        with self._lock:
            for k in keys:
                if k in self._hints:
                    self._hints.move_to_end(k)
                else:
                    self._hints[k] = ns_id
            while len(self._hints) > HINTS:
                self._hints.popitem(last=False)

    def ns_of(self, key: BlockKey) -> bytes | None:
        """The namespace learnt for ``key`` (no I/O: a peek that may name a block the cluster lost)."""
        with self._lock:
            return self._hints.get(key)

    def _forget(self, keys: Iterable[BlockKey]) -> None:
        with self._lock:
            for k in keys:
                self._hints.pop(k, None)

    # -- reads ----------------------------------------------------------------------------------------
    def contains(self, key: BlockKey) -> bool:
        return self.contains_many([key])[0]

    def contains_many(self, keys: Iterable[BlockKey]) -> list[bool]:
        return self.remote.contains_many(list(keys))

    def read(self, key: BlockKey, ops: TierOps | None = None) -> tuple[Block, str] | None:
        """The block from the cluster, verified (record checksum, then the raw bytes' XXH3 on decode)."""
        t0 = now_ns() if ops is not None else 0
        ns_id = self.ns_of(key)
        record = self.remote.get_many([key]).get(key) if ns_id is not None else None
        block = None if record is None else self._decode(key, record, ns_id)
        if ops is not None:
            ops.record("remote.read", t0, now_ns(), nbytes=len(record or b""), hit=block is not None)
        return None if block is None else (block, self.name)

    def _decode(self, key: BlockKey, record: bytes, ns_id: bytes) -> Block | None:
        try:
            plain = self.sealer.open(key.digest, record) if self.sealer is not None else record
            header, raw = self.codec.decode(plain)
        except ChecksumError:
            with self._lock:
                self._decode_failures += 1
            return None
        return Block(torch.from_numpy(raw), header.dtype, header.shape, header.checksum, ns_id, header.lossy_codec,
                     header.lossy)

    def get(self, key: BlockKey) -> Block | None:
        got = self.read(key)
        return None if got is None else got[0]

    @property
    def checksum_failures(self) -> int:  # type: ignore[override]
        """Remote values that failed verification (damaged, torn, foreign) or decoding."""
        with self._lock:
            failures = self._decode_failures
        return failures + self.remote.stats()["corrupt"]

    def keys(self) -> Iterator[BlockKey]:
        return iter(())

    def keys_of_namespace(self, ns_id: bytes) -> list[BlockKey]:
        """The keys learnt for ``ns_id`` (the cluster is not walked)."""
        with self._lock:
            return [k for k, n in self._hints.items() if n == ns_id]

    # -- writes ---------------------------------------------------------------------------------------
    def put(self, key: BlockKey, block: Block) -> None:
        """Queue one block for an asynchronous write (when the write mode is ``all``)."""
        raw = block.data if block.data.device.type == "cpu" else block.data.cpu()
        record = self.codec.encode(raw.numpy(), block.dtype, block.shape, block.checksum, block.cold_codec)
        if self.sealer is not None:
            record = self.sealer.seal(key.digest, record)
        self.remote.put_many([(key, record)], durable=False)

    def put_records(self, items: list[tuple[BlockKey, bytes]], *, durable: bool) -> PutResult:
        """:meth:`RemoteTier.put_many` of encoded (sealed) cold records."""
        return self.remote.put_many(items, durable=durable)

    def delete_many(self, keys: Iterable[BlockKey]) -> list[BlockKey]:
        """Delete the blocks from the cluster; returns those that were there.

        :raises TierUnavailable: if some node could not be reached.
        """
        keys = list(dict.fromkeys(keys))
        if not keys:
            return []
        there = self.remote.contains_many(keys)
        self.remote.delete_many(keys)
        self._forget(keys)
        return [k for k, here in zip(keys, there) if here]

    def delete(self, key: BlockKey) -> bool:
        return bool(self.delete_many([key]))

    # -- sessions -------------------------------------------------------------------------------------
    def session_get(self, sid: bytes) -> bytes | None:
        """The shared record of session ``sid`` (``None``: absent, damaged or unreachable)."""
        got = self.remote.get_session(sid)
        return None if got is None else got[0]

    def session_put(self, sid: bytes, record: bytes, version: int, *, durable: bool) -> WriteOutcome:
        """Store a session record, last writer (highest ``version``) wins. :raises RemoteWriteFailed:
        when ``durable`` and it was not acknowledged."""
        return self.remote.put_session(sid, record, version, durable=durable)

    def session_delete(self, sid: bytes) -> None:
        """:raises TierUnavailable: if the cluster could not be reached."""
        self.remote.delete_session(sid)

    # -- eviction and accounting: nothing local --------------------------------------------------------
    def victims(self, nbytes: int, protected: Callable[[BlockKey], bool]) -> list[BlockKey] | None:
        return []

    def evict(self, keys: list[BlockKey]) -> list[tuple[BlockKey, Block | None]]:
        return []

    @property
    def capacity_bytes(self) -> int:
        return 0

    @property
    def used_bytes(self) -> int:
        return 0

    def ns_used_bytes(self, ns_ids: Iterable[bytes]) -> int:
        return 0

    def block_count(self) -> int:
        return 0

    def stats(self) -> dict:
        """The remote tier's state and counters (:meth:`RemoteTier.stats`)."""
        return self.remote.stats()

    def flush(self, timeout: float | None = None) -> None:
        self.remote.flush(10.0 if timeout is None else timeout)

    def close(self) -> None:
        self.remote.close()
