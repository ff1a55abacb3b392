"""Checks a cold tier runs as it opens: the data file is not empty nor truncated, and the encryption
keys match the store. Imports lmdb's objects only through its arguments, ``crypto`` and ``schema``.

Each check raises :class:`~tiering.errors.TierUnavailable` with a message naming the file or the
directory and what to do, so ``kvtier serve`` exits with one clear line instead of serving nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..crypto import MAX_KEY_ID, RecordSealer
from ..errors import TierUnavailable
from .schema import key_id_key


def check_not_empty(path: str) -> None:
    """Refuse a 0-byte ``data.mdb`` (before LMDB opens it): LMDB would take it for a new file and start
    an empty store over it, silently. LMDB writes its meta pages when it creates the file, so an empty
    one lost its contents (a copy cut short, a full disk, a restore that truncated it).

    :raises TierUnavailable: naming the file and what to do.
    """
    data = os.path.join(path, "data.mdb")
    if os.path.isfile(data) and os.path.getsize(data) == 0:
        raise TierUnavailable(
            f"the cold tier file {data!r} is empty (0 bytes): its contents were lost (a copy cut short, a "
            f"full disk, a restore that truncated it). Restore it from a backup, or delete it (or move the "
            f"{path!r} directory away) to start with an empty cold tier")


def check_file_size(env, path: str) -> None:
    """Refuse a truncated ``data.mdb`` before any page beyond its meta pages is touched.

    LMDB memory-maps the file and trusts its meta page: reading a page past the end of a truncated
    file raises SIGBUS and kills the process, at every restart. A healthy file always reaches the
    last page its newest meta page names (pages are written before the meta that names them).

    :raises TierUnavailable: naming the file and what to do.
    """
    data = os.path.join(path, "data.mdb")
    size = os.path.getsize(data)
    psize = env.stat()["psize"]  # from the meta page: touches no other page
    need = (env.info()["last_pgno"] + 1) * psize
    if size < need:
        raise TierUnavailable(
            f"the cold tier file {data!r} is truncated: {size} bytes, but its LMDB header names pages up "
            f"to byte {need} (a damaged disk, a copy cut short, or a full file system). Restore it from a "
            f"backup, or move the {path!r} directory away to start with an empty cold tier")


def fingerprints(env, info) -> dict[int, bytes]:
    """Key id → fingerprint of every key that ever sealed records of this store (empty: plain store)."""
    with env.begin(db=info) as txn:
        stored = {i: txn.get(key_id_key(i)) for i in range(MAX_KEY_ID + 1)}
    return {i: bytes(f) for i, f in stored.items() if f is not None}


def check_key(env, db: dict, path: str, sealer: RecordSealer | None, *, readonly: bool,
              block_count: Callable[[], int]) -> None:
    """Refuse a missing key for an encrypted store, a key whose id sealed this store's records with
    another key, or a key for a store of plain records; remember the fingerprints of new key ids
    (unless ``readonly``). A key id the store has never seen is accepted, and a stored id the sealer
    lacks too (a removed key: its records read as misses).

    :raises TierUnavailable: naming the directory and the key ids at fault.
    """
    stored = fingerprints(env, db["info"])
    if stored and sealer is None and not readonly:
        raise TierUnavailable(
            f"the cold tier at {path!r} is encrypted: configure its key (security.cold_key_file "
            "or the KVTIER_COLD_KEY environment variable)")
    if sealer is None:
        return
    wrong = sorted(i for i, f in sealer.fingerprints.items() if stored.get(i, f) != f)
    if wrong:
        raise TierUnavailable(f"the cold tier at {path!r} was encrypted with another key under key "
                              f"id {', '.join(map(str, wrong))}")
    if not stored and not readonly and block_count():
        raise TierUnavailable(
            f"the cold tier at {path!r} holds unencrypted blocks; encryption can only be "
            "switched on for an empty data directory")
    new = {i: f for i, f in sealer.fingerprints.items() if i not in stored}
    if new and not readonly:
        with env.begin(write=True, db=db["info"]) as txn:
            for i, f in new.items():
                txn.put(key_id_key(i), f)
