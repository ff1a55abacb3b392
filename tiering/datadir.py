"""The data directory's lock file: one kvtier process per data directory. Imports ``errors`` only."""

from __future__ import annotations

import fcntl
import os

from .errors import TierUnavailable


def lock_data_dir(data_dir: str):
    """Take the data directory's lock file (one process per directory), writing our pid into it."""
    try:
        os.makedirs(data_dir, exist_ok=True)
        fh = open(os.path.join(data_dir, "kvtier.lock"), "a+")
    except OSError as exc:
        raise TierUnavailable(f"cannot use data directory {data_dir!r}: {exc}. Create it, make it "
                              "writable, or pass another --data-dir") from exc
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        owner = fh.read().strip() or "unknown"
        fh.close()
        raise TierUnavailable(f"data directory {data_dir!r} is in use by another kvtier process (pid "
                              f"{owner}); stop it or pass another --data-dir") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh
