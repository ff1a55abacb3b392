"""Offline, read-only summary and verification of a kvtier data directory (``kvtier inspect DATA_DIR``,
``kvtier check DATA_DIR``).

Opens the cold tier's LMDB read-only and without LMDB's lock file writes, so it works while a
server holds the directory (it then sees the last committed transaction) and never changes it.
Raw and stored bytes are summed over the records (header and length): O(blocks), no decompression.
The compression ratio is :func:`~kvtier.service.apps.tables.compression_ratio` of the two, the same
figure ``kvtier stats`` shows for what a server wrote.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from kvtier.service.apps.tables import compression_ratio
from kvtier.tiering.codec import Codec
from kvtier.tiering.cold import ColdTier
from kvtier.tiering.cold.verify import Report
from kvtier.tiering.crypto import RecordSealer
from kvtier.tiering.errors import TierUnavailable
from kvtier.tiering.sessions import Session, namespace_from_dict


def open_readonly(data_dir: str | os.PathLike, sealer: RecordSealer | None = None, *,
                  sessions_complete: bool = True) -> ColdTier:
    """The cold tier of ``data_dir``, opened read-only without LMDB's lock file writes (safe beside a
    running server). The caller closes it. ``sessions_complete``: see :class:`ColdTier`.

    :raises FileNotFoundError: if ``data_dir`` holds no cold tier.
    :raises TierUnavailable: if the LMDB environment cannot be opened, or ``sealer`` holds another key.
    """
    data_file = Path(data_dir) / "cold" / "data.mdb"
    if not data_file.is_file():
        raise FileNotFoundError(f"no kvtier store in {str(data_dir)!r} (missing {data_file})")
    # Read-only: LMDB grows the map to the file's size, so the capacity given here only has to be positive.
    return ColdTier(str(data_file.parent), max(data_file.stat().st_size, 1 << 20), Codec(), readonly=True,
                    sealer=sealer, sessions_complete=sessions_complete)


def check_dir(data_dir: str | os.PathLike, sealer: RecordSealer | None = None, *, write_back: bool = False) -> Report:
    """Verify every record, session and counter of the store in ``data_dir`` (``tiering/cold/verify.py``),
    read-only. O(stored bytes). ``write_back``: the store was served with ``write_policy=write_back``
    (its sessions may name blocks that never reached disk: a hole in a chain is not damage).

    :raises FileNotFoundError: if ``data_dir`` holds no cold tier.
    :raises TierUnavailable: if it cannot be opened, or is encrypted and ``sealer`` is ``None``.
    """
    cold = open_readonly(data_dir, sealer, sessions_complete=not write_back)
    try:
        if cold.encrypted and sealer is None:
            raise TierUnavailable(f"the store in {str(data_dir)!r} is encrypted: give its key "
                                  "(--cold-key-file, or the KVTIER_COLD_KEY environment variable) to verify it")
        return cold.walk()
    finally:
        cold.close()


def summarize(data_dir: str | os.PathLike) -> dict:
    """Counts and sizes of the store in ``data_dir``.

    :returns: a JSON-ready dict: ``data_dir``, ``blocks``, ``sessions``, ``raw_bytes`` (decoded),
        ``stored_bytes`` (encoded records), ``compression_ratio`` (raw/stored, ``None`` when empty),
        ``footprint_bytes`` (what the cold tier charges against its capacity: records plus LMDB page
        and index overhead), ``file_bytes`` (size of ``data.mdb``),
        ``namespaces`` (per namespace: tenant, model, revision, layout, blocks, sessions).
    :raises FileNotFoundError: if ``data_dir`` holds no cold tier.
    :raises TierUnavailable: if the LMDB environment cannot be opened.
    """
    cold = open_readonly(data_dir)
    data_file = Path(data_dir) / "cold" / "data.mdb"
    try:
        namespaces = cold.namespaces()
        sessions = [Session.from_json(raw) for _sid, raw in cold.session_items()]
        per_ns_sessions = Counter(s.namespace.ns_id for s in sessions)
        raw = stored = 0
        for key in cold.keys():
            record = cold.get_record(key)
            if record is not None:  # None: deleted since keys() listed it (a live server's directory)
                raw += Codec.read_header(record).raw_length
                stored += len(record)
        rows = []
        for ns_id, d in sorted(namespaces.items(), key=lambda kv: (kv[1]["tenant"], kv[1]["model"])):
            ns = namespace_from_dict(d)
            rows.append({"tenant": ns.tenant, "model": ns.model, "revision": ns.revision,
                         "layout": ns.layout.describe(), "blocks": len(cold.keys_of_namespace(ns_id)),
                         "sessions": per_ns_sessions.get(ns_id, 0)})
        return {"data_dir": str(Path(data_dir).resolve()), "blocks": cold.block_count(), "sessions": len(sessions),
                "raw_bytes": raw, "stored_bytes": stored, "compression_ratio": compression_ratio(raw, stored),
                "footprint_bytes": cold.used_bytes, "file_bytes": data_file.stat().st_size, "namespaces": rows}
    finally:
        cold.close()
