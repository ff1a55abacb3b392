"""Counters the store keeps: per tier, between tiers, and for the store as a whole.
Imports the standard library and ``codec`` (record codec names) only.

Plain integers bumped under the store's lock; :meth:`StoreStats.snapshot` copies them for readers
(the Stats RPC, the metrics exporter), so readers never block the data path for long.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from .codec import codec_name


@dataclass(slots=True)
class TierStats:
    """Counters of one tier.

    ``hits``/``misses`` follow cache-hierarchy (L1/L2) semantics: they count the gets that *reached*
    this tier. A get served by warm is a miss in hot and a hit in warm; one served by cold is a miss
    in every memory tier and a hit in cold. So ``hot.hits / (hot.hits + hot.misses)`` is the hot hit
    rate, and the share of gets served by a tier is its ``hits`` over all gets. A block served from
    the write queue (not yet on disk) is a miss of every memory tier; it is the durable tier's hit
    only when the queue is reported under that tier's name (no warm tier), else no tier's hit.
    """

    hits: int = 0
    misses: int = 0
    promotions: int = 0  # blocks copied into this tier from a lower one
    demotions: int = 0  # blocks copied to a lower tier as they left this one (next cache, or write-back queue)
    evictions: int = 0  # blocks that left this tier without a copy below being made now (not both)
    checksum_failures: int = 0


@dataclass(slots=True)
class StoreStats:
    tiers: dict[str, TierStats] = field(default_factory=dict)
    #: bytes moved between tiers, keyed ``"warm->hot"``, ``"cold->warm"``, ``"hot->warm"``, ``"mem->cold"``…
    bytes_moved: Counter = field(default_factory=Counter)
    puts: int = 0
    blocks_stored: int = 0
    blocks_skipped_present: int = 0
    blocks_skipped_admission: int = 0
    #: blocks put under a key a cache held with other bytes (a nondeterministic producer): the first
    #: writer's bytes stay, the later writer's are dropped (told skipped_present)
    put_conflicts: int = 0
    gets: int = 0
    prefetches: int = 0
    cold_raw_bytes_written: int = 0
    cold_record_bytes_written: int = 0
    #: raw bytes and stored (record) bytes written to the durable tier, per record codec (``shuffle_zstd``,
    #: ``fp8_e4m3``…): what each codec, lossy ones in particular, saved
    codec_raw_bytes: Counter = field(default_factory=Counter)
    codec_stored_bytes: Counter = field(default_factory=Counter)
    write_errors: int = 0
    #: failed cold writes of requests answered before the commit (non-durable puts, write-back
    #: demotions): their blocks are not on disk (they stay served from memory until evicted)
    background_write_failures: int = 0

    def tier(self, name: str) -> TierStats:
        t = self.tiers.get(name)
        if t is None:
            t = self.tiers[name] = TierStats()
        return t

    def count_commit(self, tier: str, jobs, evicted: list, error: BaseException | None) -> None:
        """Count one commit of the durable ``tier``: bytes written (raw and encoded), a failed write,
        the blocks it evicted to make room."""
        if error is None:
            for job in jobs:
                self.cold_raw_bytes_written += sum(b.nbytes for _, b in job.blocks)
                self.cold_record_bytes_written += job.record_bytes
                for (_key, block), record in zip(job.blocks, job.records):
                    name = codec_name(record)
                    self.codec_raw_bytes[name] += block.nbytes
                    self.codec_stored_bytes[name] += len(record)
        else:
            self.write_errors += 1
            self.background_write_failures += sum(1 for job in jobs if job.acknowledged)
        self.tier(tier).evictions += len(evicted)

    def snapshot(self) -> dict:
        d = asdict(self)
        d["bytes_moved"] = dict(self.bytes_moved)
        d["codec_raw_bytes"] = dict(self.codec_raw_bytes)
        d["codec_stored_bytes"] = dict(self.codec_stored_bytes)
        return d
