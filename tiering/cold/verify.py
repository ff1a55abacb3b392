"""The verification walk of a cold tier: every record decoded against its checksum (sealed ones opened
with the configured keys), every session's chain, the namespace registry and the accounting. Imports
``codec``, ``crypto``, ``errors``, ``keys``, ``sessions`` and the cold ``footprint``/``schema`` modules.

:func:`walk` only reads, inside one read transaction (a consistent snapshot, even beside a live
writer); what to do about damage is the caller's: ``ColdTier.check`` reports it, ``ColdTier.verify``
(startup verification) also deletes the damaged records, ``kvtier check`` prints it.

What counts as a problem (each one line of :attr:`Report.problems`):

* an index or counter that disagrees with the records (``footprint.check``);
* a record that does not decode, fails its checksum, or fails authentication (:attr:`Report.damaged`);
* a record sealed under a key id that is not configured, or sealed while no key is configured;
* a session or namespace record that is not JSON; a session record with a chain (``keys``) that does
  not parse, or whose namespace is not registered;
* with ``sessions_complete`` (write-through stores: a session record is committed with every block
  it names, or after them), a session chain with a *hole*: a block missing between two blocks that
  are stored. Eviction (oldest written first) only takes blocks from the front of a chain; a lost or
  deleted block leaves a hole. Chains missing only their front or end are counted in
  :attr:`Report.partial_sessions`, not problems; so are chains with holes in a write-back store,
  whose sessions may name blocks that were only ever in memory;
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from ..codec import Codec
from ..crypto import RecordSealer, UnknownKeyId, is_sealed, key_id_of
from ..errors import ChecksumError
from ..keys import BlockKey
from ..sessions import Session
from . import footprint as fp

#: Records between two calls of the progress callback.
PROGRESS_EVERY = 10_000


@dataclass(slots=True)
class Report:
    """What :func:`walk` found.

    :ivar records: records read. :ivar sessions: session records read. :ivar namespaces: namespaces read.
    :ivar damaged: ``(key, reason)`` of each record that failed to decode, its checksum or authentication.
    :ivar unknown_key: records sealed under a key id that is not configured, by id.
    :ivar partial_sessions: sessions missing blocks of their chain that are not problems: only its
        front or end (evicted), or anywhere in a write-back store (blocks that never reached disk).
    :ivar problems: every problem, one line each (the damaged records included).
    """

    records: int = 0
    sessions: int = 0
    namespaces: int = 0
    damaged: list[tuple[BlockKey, str]] = field(default_factory=list)
    unknown_key: Counter = field(default_factory=Counter)
    partial_sessions: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: what was walked and how many problems were found."""
        state = "clean" if not self.problems else f"{len(self.problems)} problem(s)"
        return (f"{state}: {self.records} records ({len(self.damaged)} damaged), {self.sessions} sessions "
                f"({self.partial_sessions} partly evicted), {self.namespaces} namespaces")


def record_problem(codec: Codec, sealer: RecordSealer | None, key: bytes, record) -> str | None:
    """Why ``record`` (stored under ``key``) cannot be served, or ``None`` when it decodes and matches
    its checksum. Decodes into a scratch buffer: O(record).

    :raises UnknownKeyId: if it is sealed under a key id ``sealer`` does not hold.
    """
    try:
        if sealer is not None:
            record = sealer.open(key, record)
        elif is_sealed(record):
            return "sealed, and no key is configured"
        codec.decode(record)
    except UnknownKeyId:
        raise
    except ChecksumError as exc:
        return str(exc)
    return None


def walk(txn, db: dict, codec: Codec, sealer: RecordSealer | None, capacity: int, *, sessions_complete: bool,
         progress: Callable[[int, int], None] | None = None) -> Report:
    """Verify everything in ``txn`` (a read transaction of the cold tier). O(stored bytes).

    :param sessions_complete: a hole inside a session's chain is damage (module docstring).
    :param progress: called ``(records done, records in all)`` every :data:`PROGRESS_EVERY` records.
    """
    rep = Report(problems=fp.check(txn, db, capacity))
    total = txn.stat(db["blocks"])["entries"]
    for k, record in txn.cursor(db=db["blocks"]).iternext():
        rep.records += 1
        try:
            why = record_problem(codec, sealer, bytes(k), record)
        except UnknownKeyId:
            rep.unknown_key[key_id_of(record)] += 1
            why = None
        if why is not None:
            rep.damaged.append((BlockKey(bytes(k)), why))
        if progress is not None and rep.records % PROGRESS_EVERY == 0:
            progress(rep.records, total)
    no_key = [key for key, why in rep.damaged if why.startswith("sealed, and no key")]
    rep.problems += [f"cold: block {key} is damaged: {why}" for key, why in rep.damaged if key not in no_key]
    if no_key:
        rep.problems.append(f"cold: {len(no_key)} records are sealed and no key is configured to verify them")
    rep.problems += [f"cold: {n} records are sealed with key id {i}, which is not configured (they read as misses)"
                     for i, n in sorted(rep.unknown_key.items())]
    registered = _namespaces(txn, db, rep)
    _sessions(txn, db, registered, sessions_complete, rep)
    return rep


def _namespaces(txn, db: dict, rep: Report) -> set[bytes]:
    ids = set()
    for k, v in txn.cursor(db=db["namespaces"]).iternext():
        rep.namespaces += 1
        ids.add(bytes(k))
        try:
            json.loads(bytes(v))
        except ValueError:
            rep.problems.append(f"cold: namespace {bytes(k).hex()} is not JSON")
    return ids


def _sessions(txn, db: dict, registered: set[bytes], complete: bool, rep: Report) -> None:
    meta = db["meta"]
    for k, v in txn.cursor(db=db["sessions"]).iternext():
        rep.sessions += 1
        name = bytes(k).replace(b"\0", b"/").decode("utf-8", "replace")
        try:
            d = json.loads(bytes(v))
        except ValueError:
            rep.problems.append(f"cold: session {name} is not JSON")
            continue
        if not (isinstance(d, dict) and "keys" in d):
            continue  # opaque to this tier (a test's record): nothing more to check
        try:
            s = Session.from_json(bytes(v))
        except (ValueError, KeyError, TypeError) as exc:
            rep.problems.append(f"cold: session {name} does not parse ({type(exc).__name__})")
            continue
        if s.namespace.ns_id not in registered:
            rep.problems.append(f"cold: session {name} names a namespace that is not registered")
        stored = [txn.get(key.digest, db=meta) is not None for key in s.keys]
        present = [i for i, ok in enumerate(stored) if ok]
        holes = present[-1] - present[0] + 1 - len(present) if present else 0
        if holes and complete:
            rep.problems.append(f"cold: session {name} is missing {holes} block(s) inside its chain of "
                                f"{len(stored)} (lost or deleted, not evicted)")
        elif len(present) < len(stored):
            rep.partial_sessions += 1
