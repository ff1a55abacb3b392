"""RemoteTier: blocks and sessions in a shared Redis Cluster, in the cold tier's record format.

Imports redis-py (through ``link``), OpenTelemetry's API (a tracer given from outside) and tiering's
codec, crypto, keys and errors; never ``service/``. Layout of values: ``records`` and ``sessions``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence

from redis.cluster import ClusterNode

from ..codec import Codec
from ..crypto import RecordSealer, is_sealed
from ..errors import ChecksumError, TierUnavailable
from ..keys import BlockKey
from . import records, sessions
from . import units as units_
from .breaker import CircuitBreaker
from .config import RemoteConfig
from .link import REFRESH_KINDS, RETRY_KINDS, ClusterLink, NodeExchange, error_kind
from .results import PutResult, RemoteWriteFailed, WriteOutcome
from .units import Unit
from .writer import AsyncWriter, QueuedWrite


class RemoteTier:
    """A client of a Redis Cluster holding cold-format block records and session records.

    Blocking and thread-safe: the engine calls it from worker threads, never from an event loop.
    Reads never raise: a failure, a timeout or damaged bytes is a miss, counted in :meth:`stats`.

    :param config: see :class:`RemoteConfig`.
    :param sealer: the cold tier's sealer when encryption at rest is on: every record read must open
        with it (bound to its block key), else it is a miss; records are stored as given (sealed).
    :param tracer: an OpenTelemetry tracer for ``kvtier.remote.read``/``kvtier.remote.write`` spans
        (one per node exchange: node address, slot, bytes, outcome; never keys or bytes).
    """

    name = "remote"

    def __init__(self, config: RemoteConfig, *, sealer: RecordSealer | None = None, tracer=None) -> None:
        self.config = config
        self._sealer = sealer
        self._tracer = tracer
        self._link = ClusterLink(config)
        self._breaker = CircuitBreaker(config.breaker_failures, config.breaker_cooldown_s)
        self._lock = threading.Lock()
        self._counts: Counter = Counter()
        self._errors: Counter = Counter()
        self._last_error = ""
        self._parts_guess = 1
        self._writer = AsyncWriter(self._write_batch, config.max_inflight_bytes,
                                   max(config.max_part_bytes, config.max_inflight_bytes // 4))

    # ---- accounting ------------------------------------------------------------------------------
    def _count(self, **deltas: int) -> None:
        with self._lock:
            self._counts.update(deltas)

    def _error(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self._errors[kind] += n
            self._last_error = kind
        if kind in REFRESH_KINDS:
            self._link.request_refresh()

    def stats(self) -> dict:
        """Counters and state: ``state`` (closed/open/half-open), hits, misses, corrupt, errors by kind,
        bytes in/out, durable/non-durable writes, dropped writes, queued bytes, last error kind."""
        with self._lock:
            out = {k: self._counts.get(k, 0) for k in (
                "hits", "misses", "corrupt", "short_circuited", "bytes_in", "bytes_out", "writes_durable",
                "writes_not_durable", "writes_async", "dropped", "stale_sessions", "deletes", "redirects")}
            out["errors"] = dict(self._errors)
            out["last_error"] = self._last_error
        out["state"] = self._breaker.state
        out["breaker_opened"] = self._breaker.opened
        out["inflight_bytes"] = self._writer.inflight_bytes
        return out

    # ---- running units on their nodes --------------------------------------------------------------
    def _run(self, units: list[Unit], op: str, *, wait_replicas: int = 0) -> None:
        """Send every unit's commands, one pipeline per node (+ ``WAIT`` when ``wait_replicas``); fill
        each unit's ``replies``/``kind``/``replicas``. A unit answered ``MOVED`` (its slot has moved; the
        topology refresh is asked for) or ``ASK`` (its slot is migrating) is sent once more, at once, to
        the node the answer names (after ``ASKING`` for each command on an ``ASK``). Never raises."""
        for u in units:
            u.kind, u.replies, u.replicas, u.redirect, u.asking = None, None, None, None, False
        self._run_once(units, op, wait_replicas, redirected=False)
        moved = [u for u in units if u.kind in ("ask", "moved") and u.redirect is not None]
        if moved:
            self._count(redirects=len(moved))
            if any(u.kind == "moved" for u in moved):
                self._link.request_refresh()
            for u in moved:
                u.asking = u.kind == "ask"
            self._run_once(moved, op, wait_replicas, redirected=True)
        for kind in (u.kind for u in units if u.kind):
            self._error(kind)

    def _run_once(self, units: list[Unit], op: str, wait_replicas: int, *, redirected: bool) -> None:
        groups: dict[str, tuple[ClusterNode, list[Unit]]] = {}
        for u in units:
            try:
                node = self._link.node_at(*u.redirect) if redirected else self._link.route(u.name)
            except Exception as exc:  # cluster unreachable, slot uncovered: this unit fails
                u.kind = error_kind(exc)
                continue
            groups.setdefault(node.name, (node, []))[1].append(u)
        batches: dict[str, tuple[ClusterNode, list[tuple]]] = {}
        timeout = 0.0
        for name, (node, group) in groups.items():
            cmds = [c for u in group for cmd in u.commands for c in ((("ASKING",), cmd) if u.asking else (cmd,))]
            t = self.config.timeout(sum(u.nbytes for u in group))
            if wait_replicas:
                cmds.append(("WAIT", wait_replicas, max(1, int(t * 1000))))
                t *= 2
            timeout = max(timeout, t)
            batches[name] = (node, cmds)
        answers = self._link.exchange(batches, timeout) if batches else {}
        for name, ans in answers.items():
            group = groups[name][1]
            self._span(op, ans, group)
            if ans.error is not None:
                for u in group:
                    u.kind = error_kind(ans.error)
                continue
            i = 0
            for u in group:
                step = 2 if u.asking else 1  # the ASKING replies are skipped
                n = len(u.commands) * step
                u.replies = ans.replies[i + step - 1:i + n:step]
                i += n
                bad = next((r for r in u.replies if isinstance(r, Exception)), None)
                u.kind = None if bad is None else error_kind(bad)
                u.redirect = getattr(bad, "node_addr", None) if u.kind in ("ask", "moved") else None
            if wait_replicas:
                acked = ans.replies[-1]
                for u in group:
                    u.replicas = acked if isinstance(acked, int) else 0

    def _span(self, op: str, ans: NodeExchange, group: list[Unit]) -> None:
        if self._tracer is None:
            return
        host, _, port = ans.address.rpartition(":")
        slots = {self._link.slot(u.name) for u in group}
        attrs = {"kvtier.tier": "remote", "server.address": host, "server.port": int(port or 0),
                 "kvtier.blocks": len(group), "kvtier.bytes": sum(u.nbytes for u in group),
                 "kvtier.outcome": "ok" if ans.error is None else error_kind(ans.error),
                 "kvtier.remote.slot": min(slots), "kvtier.remote.slots": len(slots)}
        span = self._tracer.start_span(f"kvtier.remote.{op}", start_time=ans.start_ns, attributes=attrs)
        span.end(end_time=ans.end_ns)

    def _settle(self, units: Sequence[Unit], started: float) -> None:
        """Tell the breaker how an operation went: failed if any unit hit an availability error or it was slow."""
        failed = next((u.kind for u in units if u.kind in RETRY_KINDS), None)
        budget = self.config.slow_budget_s + sum(u.nbytes for u in units) / self.config.min_throughput_bps
        slow = time.monotonic() - started > budget
        self._breaker.record(failed is None and not slow, failed or ("slow" if slow else ""))

    # ---- reads -------------------------------------------------------------------------------------
    def get_many(self, keys: Iterable[BlockKey], *, max_record_bytes: int | None = None) -> dict[BlockKey, bytes]:
        """The verified records of the keys the cluster holds (absent keys are misses).

        A hit refreshes the TTL of the block's parts. Damaged, torn, foreign or unsealed-when-sealing
        records are misses counted as ``corrupt``. Each node's MGET is bounded by ``config.timeout``.

        :param max_record_bytes: the largest record expected (sizes the first MGET); else learnt.
        :returns: key → record bytes exactly as put. Copies: hiredis → one bytes per part, joined (1).
        """
        keys = list(dict.fromkeys(keys))
        if not keys:
            return {}
        if not self._breaker.allow():
            self._count(short_circuited=len(keys), misses=len(keys))
            return {}
        started = time.monotonic()
        guess = (records.parts_needed(max_record_bytes, self.config.max_part_bytes) if max_record_bytes
                 else self._parts_guess)
        found: dict[BlockKey, bytes] = {}
        todo = {k: guess for k in keys}
        units: list[Unit] = []
        for _round in range(2):
            batch = [units_.block_read(self.config, k, n) for k, n in todo.items()]
            self._run(batch, "read")
            units += batch
            todo = {}
            for u in batch:
                if u.replies is None or not isinstance(u.replies[0], list):
                    continue  # the node or its MGET failed (a failed TTL refresh alone does not matter)
                values = u.replies[0]
                joined = records.join(u.ident, values)
                self._count(bytes_in=sum(len(v) for v in values if v is not None))
                if joined.status == "more":
                    todo[u.ident] = joined.parts
                    with self._lock:
                        self._parts_guess = max(self._parts_guess, joined.parts)
                elif joined.status == "ok" and self._verified(u.ident, joined.record):
                    found[u.ident] = joined.record
                elif joined.status != "missing":
                    self._count(corrupt=1)
            if not todo:
                break
        self._settle(units, started)
        self._count(hits=len(found), misses=len(keys) - len(found))
        return found

    def _verified(self, key: BlockKey, record: bytes) -> bool:
        try:
            if self._sealer is not None:
                Codec.read_header(self._sealer.open(key.digest, record))
            elif is_sealed(record):
                return False
            else:
                Codec.read_header(record)
        except ChecksumError:
            return False
        return True

    def contains_many(self, keys: Sequence[BlockKey]) -> list[bool]:
        """Whether each key's part 0 (its manifest) exists now: a cheap hint; a later get may still miss
        if another part is gone. Unreachable → ``False``."""
        if not keys or not self._breaker.allow():
            return [False] * len(keys)
        started = time.monotonic()
        units = [Unit(k, base, [("EXISTS", base)], 0)
                 for k, base in ((k, records.block_base(self.config.key_prefix, k)) for k in keys)]
        self._run(units, "read")
        self._settle(units, started)
        return [u.kind is None and u.replies[0] == 1 for u in units]

    # ---- writes ------------------------------------------------------------------------------------
    def _write_units(self, units: list[Unit], *, durable: bool, attempts: int) -> None:
        """Write units (retrying availability failures after a topology refresh and a backoff) and count."""
        wait = self.config.min_replicas if durable else 0
        with self._lock:  # a block unit has one SET per part: later reads fetch that many parts at once
            self._parts_guess = max([self._parts_guess, *(len(u.commands) for u in units)])
        pending = units
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(0.05 * 4 ** (attempt - 1), 1.0))
                self._link.refresh(0.0)
            if not self._breaker.allow():
                break
            started = time.monotonic()
            self._run(pending, "write", wait_replicas=wait)
            self._settle(pending, started)
            self._count(bytes_out=sum(u.nbytes for u in pending if u.kind is None))
            pending = [u for u in pending if u.kind in RETRY_KINDS]
            if not pending:
                break

    def _outcome(self, u: Unit, durable: bool) -> WriteOutcome:
        if u.kind is not None or u.replies is None:
            self._count(dropped=1)
            return WriteOutcome.DROPPED
        if isinstance(u.ident, tuple) and u.replies[-1] == 0:
            self._count(stale_sessions=1)
            return WriteOutcome.STALE
        if durable and (self.config.min_replicas == 0 or (u.replicas or 0) >= self.config.min_replicas):
            self._count(writes_durable=1)
            return WriteOutcome.DURABLE
        self._count(writes_not_durable=1)
        return WriteOutcome.WRITTEN

    def put_many(self, items: Sequence[tuple[BlockKey, bytes]], *, durable: bool) -> PutResult:
        """Write block records (cold format, sealed if the cold tier seals).

        ``durable=True`` (written when ``config.write`` is not ``off``): synchronous; one pipeline per
        node ending in ``WAIT min_replicas`` on the same connection; returns when every key is on its
        primary and acknowledged by ``min_replicas`` replicas. ``durable=False`` (written only when
        ``config.write == "all"``): queued for the writer thread, never blocks; a full queue drops.

        :returns: the outcome per key (``SKIPPED`` when the write mode says not to write).
        :raises RemoteWriteFailed: (a ``TierUnavailable``) when a durable write did not reach its replicas
            (its ``result`` says which keys did). Time bound: two attempts (the second only after an
            availability error and a topology refresh), each ``2 × config.timeout(bytes per node)``.
        """
        mode = self.config.write
        if mode == "off" or (mode == "durable" and not durable):
            return PutResult({k: WriteOutcome.SKIPPED for k, _ in items})
        if not durable:
            out = {}
            for key, record in items:
                ok = self._writer.submit(QueuedWrite(key, len(record), ("block", key, record)))
                out[key] = WriteOutcome.QUEUED if ok else WriteOutcome.DROPPED
                self._count(**({"writes_async": 1} if ok else {"dropped": 1}))
            return PutResult(out)
        units = [units_.block_write(self.config, k, r) for k, r in dict(items).items()]
        self._write_units(units, durable=True, attempts=2)
        result = PutResult({u.ident: self._outcome(u, True) for u in units})
        if not result.all_durable:
            bad = Counter(o.value for o in result.outcomes.values() if o is not WriteOutcome.DURABLE)
            raise RemoteWriteFailed(f"remote tier: durable write not acknowledged by {self.config.min_replicas} "
                                    f"replica(s) for {sum(bad.values())} of {len(units)} blocks ({dict(bad)})", result)
        return result

    def _write_batch(self, batch: list[QueuedWrite]) -> None:
        """The writer thread's work: blocks first, then sessions (so a session lands after its blocks)."""
        blocks = [units_.block_write(self.config, *q.payload[1:]) for q in batch if q.payload[0] == "block"]
        sess = [units_.session_write(self.config, *q.payload[1:]) for q in batch if q.payload[0] == "session"]
        for units in (blocks, sess):
            if units:
                self._write_units(units, durable=False,
                                  attempts=1 + self.config.retries_for(sum(u.nbytes for u in units)))
                for u in units:
                    self._outcome(u, False)

    # ---- sessions ----------------------------------------------------------------------------------
    def put_session(self, sid: bytes, record: bytes, version: int, *, durable: bool = False) -> WriteOutcome:
        """Store a session record if ``version`` is newer than the stored one (last writer wins, whole).

        ``durable=True``: synchronous, with ``WAIT`` as for blocks (call it after the blocks' durable
        put). Otherwise queued behind the blocks already queued (``QUEUED``), or ``SKIPPED`` per mode.

        :param sid: the session's (tenant, id) key (``tiering.sessions.session_id_key``).
        :param version: a timestamp in ns; equal or older than the stored version → ``STALE``.
        :raises RemoteWriteFailed: when a durable write is not acknowledged.
        """
        mode = self.config.write
        if mode == "off" or (mode == "durable" and not durable):
            return WriteOutcome.SKIPPED
        sessions.version_text(version)
        if not durable:
            ok = self._writer.submit(QueuedWrite(("session", sid), len(record), ("session", sid, record, version)))
            self._count(**({"writes_async": 1} if ok else {"dropped": 1}))
            return WriteOutcome.QUEUED if ok else WriteOutcome.DROPPED
        unit = units_.session_write(self.config, sid, record, version)
        self._write_units([unit], durable=True, attempts=2)
        outcome = self._outcome(unit, True)
        if outcome not in (WriteOutcome.DURABLE, WriteOutcome.STALE):
            raise RemoteWriteFailed(f"remote tier: durable session write {outcome.value}")
        return outcome

    def get_session(self, sid: bytes) -> tuple[bytes, int] | None:
        """``(record, version)`` of the session, or ``None`` (absent, damaged, unreachable). Refreshes its TTL."""
        if not self._breaker.allow():
            self._count(short_circuited=1)
            return None
        started = time.monotonic()
        name = records.session_name(self.config.key_prefix, sid)
        unit = Unit(("session", sid), name, [("GET", name), ("PEXPIRE", name, self.config.ttl_ms)], 0)
        self._run([unit], "read")
        self._settle([unit], started)
        value = unit.replies[0] if unit.replies else None
        if not isinstance(value, bytes):  # absent, or the GET failed (a failed TTL refresh alone does not matter)
            return None
        got = sessions.unpack(sid, value)
        if got is None:
            self._count(corrupt=1)
        return got

    def delete_session(self, sid: bytes) -> bool:
        """Delete the session record (unconditionally, whatever its version). Whether it existed.

        :raises TierUnavailable: if the cluster could not be reached (the record may survive until its TTL).
        """
        with self._writer.quiesced():
            self._writer.discard({("session", sid)})
            name = records.session_name(self.config.key_prefix, sid)
            unit = Unit(("session", sid), name, [("DEL", name)], 0)
            self._run([unit], "write")
        if unit.kind is not None:
            raise TierUnavailable(f"remote tier: session delete failed ({unit.kind})")
        return unit.replies[0] == 1

    # ---- deletes and lifecycle ---------------------------------------------------------------------
    def delete_many(self, keys: Sequence[BlockKey]) -> int:
        """Delete every part of each block. Queued asynchronous writes of these keys are discarded and a
        batch being written finishes first, so none of them lands after the delete (a durable put
        running at the same time in another thread is the caller's to order).

        :returns: blocks that existed. :raises TierUnavailable: if some node could not be reached.
        """
        keys = list(dict.fromkeys(keys))
        with self._writer.quiesced():
            self._writer.discard(set(keys))
            head = [Unit(k, b, [("GETRANGE", b, 0, records.MANIFEST.size - 1)], 0)
                    for k, b in ((k, records.block_base(self.config.key_prefix, k)) for k in keys)]
            self._run(head, "write")
            dels = [Unit(u.ident, u.name, [("DEL", *records.part_names(
                u.name, max(records.part_count(u.replies[0] or None), self._parts_guess)))], 0)
                for u in head if u.kind is None]
            self._run(dels, "write")
        failed = [u.kind for u in head + dels if u.kind is not None]
        if failed:
            raise TierUnavailable(f"remote tier: delete failed on {len(failed)} blocks ({failed[0]})")
        n = sum(1 for u in head if u.replies[0])
        self._count(deletes=n)
        return n

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait for the queued asynchronous writes; whether all were processed within ``timeout``."""
        return self._writer.flush(timeout)

    def close(self) -> None:
        """Write what is queued (bounded), then close every connection. Idempotent."""
        self._writer.close()
        self._link.close()
