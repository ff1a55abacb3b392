"""Session records and the namespace registry of the cold tier: the ``sessions`` and ``namespaces``
databases, read and written inside the caller's transaction. Imports ``json`` only.

Record contents belong to ``tiering/sessions.py``; here they are opaque bytes (namespaces are JSON).
"""

from __future__ import annotations

import json


def put_records(txn, db: dict, sessions: dict[bytes, bytes | None], namespaces: dict[bytes, bytes]) -> None:
    """Register new namespaces (never overwritten) and write or delete (``None``) session records."""
    for ns_id, rec in namespaces.items():
        txn.put(ns_id, rec, db=db["namespaces"], overwrite=False)
    for sid, rec in sessions.items():
        if rec is None:
            txn.delete(sid, db=db["sessions"])
        else:
            txn.put(sid, rec, db=db["sessions"])


def session_get(txn, db: dict, sid: bytes) -> bytes | None:
    return txn.get(sid, db=db["sessions"])


def session_items(txn, db: dict) -> list[tuple[bytes, bytes]]:
    return [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db["sessions"]).iternext()]


def session_count(txn, db: dict, prefix: bytes) -> int:
    """Session records whose key starts with ``prefix`` (a tenant's: ``tenant ‖ 0``); O(those)."""
    n = 0
    cur = txn.cursor(db=db["sessions"])
    if cur.set_range(prefix):
        for k in cur.iternext(keys=True, values=False):
            if not bytes(k).startswith(prefix):
                break
            n += 1
    return n


def namespaces(txn, db: dict) -> dict[bytes, dict]:
    return {bytes(k): json.loads(bytes(v)) for k, v in txn.cursor(db=db["namespaces"]).iternext()}
