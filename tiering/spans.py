"""TierOps: one span per tier operation per request, however many blocks the request touches.
Imports opentelemetry only.

A read of 500 blocks must not make 1,500 spans. The store records each block's tier work here
(``record("cold.read", t0, t1, nbytes=...)``, thread-safe, from any fetch thread) and :meth:`finish`
emits one span per operation, from the first start to the last end, carrying the sums. Reads overlap
(read-ahead), so that envelope is not a duration: each recorded operation is also a span event at its
own start with its real ``kvtier.duration_ns`` (and bytes), the first :data:`MAX_EVENTS` of them, and
``kvtier.busy_ns`` on the span sums every operation's duration. Operations
nest as ``cold.read → {codec.decode, promote → h2d_copy}``: the children are parented by the
aggregated span of their parent operation. Span names are ``kvtier.<op>`` (see ``service/telemetry``).

The store creates a ``TierOps`` only under a recording span (an RPC's, or ``kvtier.prefetch``) and
passes it explicitly to the fetch threads; with tracing off it passes ``None`` and records nothing.
"""

from __future__ import annotations

import hashlib
import threading
import time

from opentelemetry import trace

#: per-operation events kept on one aggregated span (OpenTelemetry's default span limit is 128)
MAX_EVENTS = 100
_PARENT = {"codec.decode": "cold.read", "promote": "cold.read", "h2d_copy": "promote"}
_TIER = {"hot.read": "hot", "warm.read": "warm", "cold.read": "cold", "codec.decode": "cold",
         "lmdb.commit": "cold"}


def session_hash(id_key: bytes) -> str:
    """A 16-hex-digit digest of a session's (tenant, id) key: correlates spans, reveals no ids."""
    return hashlib.blake2b(id_key, digest_size=8).hexdigest()


def now_ns() -> int:
    return time.time_ns()


class TierOps:
    """Sums of one request's tier operations, turned into spans by :meth:`finish`. Thread-safe.

    :param tracer: the store's tracer.
    :param parent: the span the operation spans hang under (the RPC span, or ``kvtier.prefetch``).
    """

    def __init__(self, tracer: trace.Tracer, parent: trace.Span) -> None:
        self._tracer = tracer
        self._ctx = trace.set_span_in_context(parent)
        self._ops: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._done = False

    @classmethod
    def under_current_span(cls, tracer: trace.Tracer) -> "TierOps | None":
        """Ops under the current span when it records, else ``None`` (tracing off: nothing is recorded)."""
        parent = trace.get_current_span()
        return cls(tracer, parent) if parent.is_recording() else None

    def record(self, op: str, start_ns: int, end_ns: int, *, blocks: int = 1, nbytes: int = 0,
               hit: bool = True, raw_bytes: int = 0, to_tier: str | None = None) -> None:
        """Add one block's ``op`` (``hot.read``, ``cold.read``, ``codec.decode``, ``promote``…).

        ``raw_bytes`` (decode only) is the decoded size, for the compression ratio. Records arriving
        after :meth:`finish` (a read-ahead finishing late) are dropped.
        """
        with self._lock:
            if self._done:
                return
            a = self._ops.get(op)
            if a is None:
                a = self._ops[op] = {"start": start_ns, "end": end_ns, "blocks": 0, "bytes": 0, "misses": 0,
                                     "raw": 0, "to_tier": to_tier, "busy": 0, "events": []}
            a["start"] = min(a["start"], start_ns)
            a["end"] = max(a["end"], end_ns)
            a["busy"] += end_ns - start_ns
            if len(a["events"]) < MAX_EVENTS:
                a["events"].append((start_ns, end_ns - start_ns, nbytes, hit))
            if hit:
                a["blocks"] += blocks
                a["bytes"] += nbytes
                a["raw"] += raw_bytes
            else:
                a["misses"] += blocks

    def finish(self) -> None:
        """Emit the spans (parents before children). Idempotent."""
        with self._lock:
            if self._done:
                return
            self._done = True
            ops = self._ops
        spans: dict[str, trace.Span] = {}
        for op in sorted(ops, key=lambda o: (o in _PARENT, _PARENT.get(o) in _PARENT)):
            a = ops[op]
            parent = spans.get(_PARENT.get(op, ""))
            ctx = trace.set_span_in_context(parent) if parent is not None else self._ctx
            attrs = {"kvtier.blocks": a["blocks"], "kvtier.bytes": a["bytes"], "kvtier.busy_ns": a["busy"]}
            tier = _TIER.get(op) or (op[:-len(".read")] if op.endswith(".read") else None)
            if tier:
                attrs["kvtier.tier"] = tier
            if op.endswith(".read"):
                attrs["kvtier.hit"] = a["misses"] == 0
                attrs["kvtier.misses"] = a["misses"]
            if a["raw"] and a["bytes"]:
                attrs["kvtier.compression_ratio"] = round(a["raw"] / a["bytes"], 3)
            if a["to_tier"]:
                attrs["kvtier.to_tier"] = a["to_tier"]
            span = spans[op] = self._tracer.start_span(f"kvtier.{op}", context=ctx, start_time=a["start"],
                                                       attributes=attrs)
            for start, took, nbytes, hit in a["events"]:  # one per operation: its real duration
                span.add_event(op, {"kvtier.duration_ns": took, "kvtier.bytes": nbytes, "kvtier.hit": hit},
                               timestamp=start)
        # end children first so every parent ends last, at its own recorded end (or later)
        for op in sorted(spans, key=lambda o: (o not in _PARENT, o in _PARENT and _PARENT[o] not in _PARENT)):
            end = ops[op]["end"]
            kids = [ops[k]["end"] for k, p in _PARENT.items() if p == op and k in ops]
            spans[op].end(end_time=max([end, *kids]))
