"""The cold tier's LMDB schema: database names, record structs, ``info`` keys and the u64 helpers.

Imports ``struct`` only. Part of the on-disk format: never change a layout, only add databases or keys.

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
                                                           bytes per namespace, encryption key
                                                           fingerprints (``cold_key_id``[``:``‖id])
============  ===========================================  ==========================================
"""

from __future__ import annotations

import struct

#: Named databases of the environment, in the order they are opened; ``ns_keys`` is dupsort.
DATABASES = ("blocks", "meta", "order", "ns_keys", "namespaces", "sessions", "info")
DUPSORT = {"ns_keys"}
META = struct.Struct(">Q16sI")
U64 = struct.Struct(">Q")

#: ``info`` keys: bytes used, the next write sequence number, per-namespace byte counters
#: (``ns:`` ‖ ns_id), the marker that those are maintained, and the fingerprint of each encryption key
#: by key id (:func:`key_id_key`; none: records are plain).
USED = b"used"
SEQ = b"seq"
NS_USED = b"ns:"
NS_USED_MARK = b"ns_used_v1"
KEY_ID = b"cold_key_id"


def key_id_key(key_id: int) -> bytes:
    """The ``info`` key of the fingerprint of key ``key_id``: :data:`KEY_ID` for id 0 (as written before
    key rotation existed), ``KEY_ID ‖ ":" ‖ id`` (one byte) for the others."""
    return KEY_ID if key_id == 0 else KEY_ID + b":" + bytes([key_id])


def read_u64(txn, key: bytes, db) -> int:
    """The big-endian u64 stored under ``key`` in ``db``, 0 when absent."""
    raw = txn.get(key, db=db)
    return 0 if raw is None else U64.unpack(raw)[0]


def write_u64(txn, key: bytes, value: int, db) -> None:
    txn.put(key, U64.pack(value), db=db)


def unpack_meta(raw: bytes) -> tuple[int, bytes, int]:
    """``(seq, ns_id, footprint)`` of a ``meta`` value."""
    return META.unpack(raw)
