"""KVTierMetrics: the Prometheus registry of one server — store counters read at scrape time, latency
histograms and lookup token counters observed as events happen, build info and process/Python series.

The store's counters are plain integers it already keeps (:meth:`TieredStore.snapshot`), so
:class:`StoreCollector` reads them when Prometheus scrapes and the data path pays nothing. Labels are
``tier`` (``hot``, ``warm``, ``cold``), ``from``/``to``, ``method`` and ``code`` only: never keys,
sessions or tenants. Names follow Prometheus conventions: base unit last (``_bytes``, ``_seconds``),
counters end in ``_total``, no ``_created`` series.

Metric names (all prefixed ``kvtier_``):

* per tier: ``tier_hits_total``, ``tier_misses_total``, ``tier_promotions_total`` (into the tier),
  ``tier_demotions_total`` (out of it), ``tier_evictions_total``, ``tier_checksum_failures_total``,
  ``tier_blocks``, ``tier_used_bytes``, ``tier_capacity_bytes``;
* ``moved_bytes_total{from,to}``: bytes moved between tiers;
* store: ``puts_total``, ``gets_total``, ``prefetches_total``, ``blocks_stored_total``,
  ``blocks_skipped_present_total``, ``blocks_skipped_admission_total``, ``put_conflicts_total`` (same key,
  other bytes: the first writer's stay), ``write_errors_total``, ``background_write_failures_total``,
  ``cold_raw_written_bytes_total``, ``cold_record_written_bytes_total``, ``compression_ratio`` (raw
  bytes over stored record bytes written to the cold tier, the ratio ``kvtier stats``/``inspect`` show);
* lookups (token ids given): ``lookup_query_tokens_total``, ``lookup_hit_tokens_total`` (the cached
  prefix found), so ``rate(hit) / rate(query)`` is the token-level prefix hit rate;
* queues: ``pinned_blocks``, ``active_leases``, ``cold_write_queue_depth``, ``pending_writes``,
  ``inflight_loads``;
* the shared remote tier, when configured (``tier="remote"``): ``remote_up`` (1 while its circuit
  breaker is closed), ``remote_breaker_state{state}``, ``remote_errors_total{kind}``,
  ``remote_writes_total{outcome}``, ``remote_dropped_writes_total``, ``remote_bytes_total{direction}``;
* histograms: ``rpc_duration_seconds{method,code}``, ``prefetch_duration_seconds``,
  ``resume_ready_seconds`` (Resume received → every block in the top tier);
* ``build_info{version,python,grpc}`` (always 1);

plus prometheus_client's ``process_*`` (CPU, memory, fds) and ``python_*`` (GC, version) series.
"""

from __future__ import annotations

import logging
import platform
import threading

import grpc
from prometheus_client import (CollectorRegistry, Counter, GCCollector, Histogram, Info, PlatformCollector,
                               ProcessCollector, disable_created_metrics)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvtier.service import __version__

# A _created sample per counter and histogram doubles the series and no dashboard reads them.
disable_created_metrics()

log = logging.getLogger(__name__)

_TIER_COUNTERS = (("hits", "Reads served by the tier."),
                  ("misses", "Reads the tier could not serve."),
                  ("promotions", "Blocks copied into the tier from a lower one."),
                  ("demotions", "Blocks moved out of the tier to a lower one."),
                  ("evictions", "Blocks dropped from the tier with no copy made below."),
                  ("checksum_failures", "Blocks whose bytes failed their checksum."))
_STORE_COUNTERS = (("puts", "Put calls."), ("gets", "Block reads (iter_blocks calls)."),
                   ("prefetches", "Prefetches started."), ("blocks_stored", "Blocks stored by puts."),
                   ("blocks_skipped_present", "Blocks a put skipped because they were cached."),
                   ("blocks_skipped_admission", "Blocks a put skipped by admission (too few tokens)."),
                   ("put_conflicts", "Blocks put under a held key with other bytes (first writer kept)."),
                   ("write_errors", "Failed cold-writer transactions."),
                   ("background_write_failures",
                    "Failed cold writes of requests already answered (non-durable puts, write-back demotions)."),
                   ("cold_raw_written_bytes", "Uncompressed bytes committed to the cold tier."),
                   ("cold_record_written_bytes", "Encoded record bytes committed to the cold tier."))
#: metric name → the snapshot key it reads (where the two differ)
_SNAPSHOT_KEYS = {"cold_raw_written_bytes": "cold_raw_bytes_written",
                  "cold_record_written_bytes": "cold_record_bytes_written"}
_GAUGES = (("pinned_blocks", "pinned_blocks", "Blocks pinned by leases (never eviction victims)."),
           ("active_leases", "active_leases", "Open read/prefetch leases."),
           ("cold_write_queue_depth", "write_queue_depth", "Jobs waiting for the cold writer."),
           ("pending_writes", "pending_writes", "Blocks queued for the cold tier, not yet committed."),
           ("inflight_loads", "inflight_loads", "Blocks being loaded from the cold tier now."))
#: Latency buckets from 100 µs (a hot hit) to 30 s (a large resume from disk).
_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class StoreCollector(Collector):
    """Turns one ``store.snapshot()`` per scrape into metric families. Thread-safe.

    :param store: a :class:`~tiering.store.TieredStore`; a closed or failing store yields nothing.
    """

    def __init__(self, store) -> None:
        self.store = store

    def collect(self):
        try:
            snap = self.store.snapshot()
        except Exception:  # a closed store between shutdown steps: report nothing rather than 500
            log.debug("metrics: store snapshot failed", exc_info=True)
            return
        tiers = snap.get("tiers", {})
        for name, doc in _TIER_COUNTERS:
            fam = CounterMetricFamily(f"kvtier_tier_{name}", doc, labels=["tier"])
            for tier, st in tiers.items():
                fam.add_metric([tier], st[name])
            yield fam
        usage = snap.get("usage", {})
        for name, doc in (("blocks", "Blocks held by the tier."), ("used_bytes", "Bytes held by the tier."),
                          ("capacity_bytes", "Capacity of the tier in bytes.")):
            fam = GaugeMetricFamily(f"kvtier_tier_{name}", doc, labels=["tier"])
            for tier, u in usage.items():
                fam.add_metric([tier], u[name])
            yield fam
        moved = CounterMetricFamily("kvtier_moved_bytes", "Bytes moved between tiers.", labels=["from", "to"])
        for pair, n in snap.get("bytes_moved", {}).items():
            src, _, dst = pair.partition("->")
            moved.add_metric([src, dst], n)
        yield moved
        for name, doc in _STORE_COUNTERS:
            yield CounterMetricFamily(f"kvtier_{name}", doc, value=snap[_SNAPSHOT_KEYS.get(name, name)])
        for name, key, doc in _GAUGES:
            yield GaugeMetricFamily(f"kvtier_{name}", doc, value=snap[key])
        shared = snap.get("shared")
        if shared:
            yield from _remote_families(shared)
        for which, doc in (("raw", "Raw bytes of blocks written to the cold tier, by record codec."),
                           ("stored", "Stored record bytes written to the cold tier, by record codec (lossy "
                                      "codecs: fp8_e4m3, int8, int4).")):
            fam = CounterMetricFamily(f"kvtier_cold_codec_{which}_bytes", doc, labels=["codec"])
            for codec, n in snap.get(f"codec_{which}_bytes", {}).items():
                fam.add_metric([codec], n)
            yield fam
        ratio = snap.get("compression_ratio")
        yield GaugeMetricFamily("kvtier_compression_ratio",
                                "Raw bytes over stored record bytes written to the cold tier.",
                                value=ratio if ratio is not None else float("nan"))


def _remote_families(st: dict):
    """Families of the shared (remote) tier's ``stats()`` (``snap["shared"]``), labelled ``tier``."""
    tier = st["tier"]
    up = GaugeMetricFamily("kvtier_remote_up", "1 while the remote tier's circuit breaker is closed.", labels=["tier"])
    up.add_metric([tier], 1 if st["state"] == "closed" else 0)
    yield up
    state = GaugeMetricFamily("kvtier_remote_breaker_state", "1 for the breaker's current state.",
                              labels=["tier", "state"])
    for name in ("closed", "open", "half-open"):
        state.add_metric([tier, name], 1 if st["state"] == name else 0)
    yield state
    errors = CounterMetricFamily("kvtier_remote_errors", "Failed remote operations by kind.", labels=["tier", "kind"])
    for kind, n in st["errors"].items():
        errors.add_metric([tier, kind], n)
    yield errors
    writes = CounterMetricFamily("kvtier_remote_writes", "Remote writes by outcome.", labels=["tier", "outcome"])
    for outcome in ("writes_durable", "writes_not_durable", "writes_async", "stale_sessions"):
        writes.add_metric([tier, outcome.removeprefix("writes_")], st[outcome])
    yield writes
    dropped = CounterMetricFamily("kvtier_remote_dropped_writes", "Remote writes dropped after their retries.",
                                  labels=["tier"])
    dropped.add_metric([tier], st["dropped"])
    yield dropped
    moved = CounterMetricFamily("kvtier_remote_bytes", "Bytes read from / written to the remote tier.",
                                labels=["tier", "direction"])
    moved.add_metric([tier, "in"], st["bytes_in"])
    moved.add_metric([tier, "out"], st["bytes_out"])
    yield moved


class KVTierMetrics:
    """A private registry with the histograms, lookup counters, build info and the process/Python
    collectors; :meth:`attach` adds the store's collector. Observing is thread-safe."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        Info("kvtier_build", "The running kvtier build (always 1).", registry=self.registry).info(
            {"version": __version__, "python": platform.python_version(), "grpc": grpc.__version__})
        self.lookup_query_tokens = Counter("kvtier_lookup_query_tokens", "Token ids asked about by Lookup calls.",
                                           registry=self.registry)
        self.lookup_hit_tokens = Counter("kvtier_lookup_hit_tokens",
                                         "Tokens of those found cached (the longest cached prefix).",
                                         registry=self.registry)
        self.rpc_duration = Histogram("kvtier_rpc_duration_seconds", "RPC latency as seen by the server.",
                                      ["method", "code"], buckets=_BUCKETS, registry=self.registry)
        self.prefetch_duration = Histogram("kvtier_prefetch_duration_seconds",
                                           "Prefetch start to end (blocks in the top tier or gave up).",
                                           buckets=_BUCKETS, registry=self.registry)
        self.resume_ready = Histogram("kvtier_resume_ready_seconds",
                                      "Resume received to every block of the session in the top tier.",
                                      buckets=_BUCKETS, registry=self.registry)
        self._collector: StoreCollector | None = None
        self._store = None
        self._lock = threading.Lock()

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.rpc_duration.labels(method, code).observe(seconds)

    def observe_lookup(self, query_tokens: int, hit_tokens: int) -> None:
        """One Lookup by token ids: ``query_tokens`` asked about, ``hit_tokens`` of them cached."""
        self.lookup_query_tokens.inc(query_tokens)
        self.lookup_hit_tokens.inc(hit_tokens)

    def observe_timing(self, what: str, seconds: float) -> None:
        """The store's timing hook: ``what`` is ``prefetch`` or ``resume``."""
        if what == "prefetch":
            self.prefetch_duration.observe(seconds)
        elif what == "resume":
            self.resume_ready.observe(seconds)

    def attach(self, store) -> None:
        """Expose ``store``'s counters and receive its prefetch/resume timings. Replaces an earlier store."""
        with self._lock:
            self.detach()
            self._collector = StoreCollector(store)
            self.registry.register(self._collector)
            self._store = store
            store.on_timing = self.observe_timing

    def detach(self) -> None:
        """Stop exposing the attached store (if any)."""
        if self._collector is not None:
            self.registry.unregister(self._collector)
            self._collector = None
        if self._store is not None:
            self._store.on_timing = None
            self._store = None
