"""Offline, read-only summary of a kvtier data directory (``kvtier inspect DATA_DIR``).

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
from kvtier.tiering.sessions import Session, namespace_from_dict


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
    cold_dir = Path(data_dir) / "cold"
    data_file = cold_dir / "data.mdb"
    if not data_file.is_file():
        raise FileNotFoundError(f"no kvtier store in {str(data_dir)!r} (missing {data_file})")
    # Read-only: LMDB grows the map to the file's size, so the capacity given here only has to be positive.
    cold = ColdTier(str(cold_dir), max(data_file.stat().st_size, 1 << 20), Codec(), readonly=True)
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
