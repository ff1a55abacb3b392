"""StoreConfig: every knob of the engine in one object (the service builds it from its settings).
Imports the standard library only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GiB = 1 << 30
MiB = 1 << 20


@dataclass(slots=True)
class StoreConfig:
    """Capacities, placement and policies of a :class:`~tiering.store.TieredStore`.

    :ivar data_dir: directory of the store (the cold tier lives in ``data_dir/cold``).
    :ivar hot_device: ``auto`` (cuda:0 if present, else off), ``off``, ``cpu`` (tests), ``cuda:N``.
    :ivar hot_capacity: bytes of GPU memory for blocks.
    :ivar warm_capacity: bytes of host RAM for blocks (0 switches the warm tier off).
    :ivar warm_pin: ``auto`` / ``on`` / ``off``: page-locked host buffers.
    :ivar warm_reserve: bytes of host RAM kept faulted in ahead of puts, and recycled as warm blocks
        are dropped (``tiering/hostpool.py``): a put then copies into memory that costs no page fault.
        0: no reserve (regions are still recycled). Unused with page-locked warm buffers (CUDA).
    :ivar cold_enabled: keep a cold tier at all (without it nothing survives a restart).
    :ivar cold_capacity: LMDB map size in bytes.
    :ivar policy: eviction policy of the memory tiers: ``lru`` or ``s3fifo``.
    :ivar write_policy: ``write_through`` (every block is also queued for disk; evicting from memory
        costs nothing) or ``write_back`` (blocks reach disk only when demoted out of memory, or when a
        put asks to be durable).
    :ivar zstd_level: compression level of cold records.
    :ivar codec: codec of new cold records: ``blosc2_zstd`` (default), ``shuffle_zstd``, ``zstd`` or ``raw``
        (records of every codec stay readable whatever this says).
    :ivar min_tokens: admission: requests of fewer tokens are not cached.
    :ivar lease_s: how long a read or prefetch pins its blocks at most.
    :ivar writer_batch: blocks per LMDB write transaction at most.
    :ivar compress_threads: threads compressing for the writer (zstd releases the GIL).
    :ivar prefetch_threads: threads reading and decoding for gets and prefetches.
    :ivar durable_sync: fsync every commit (off: survives a process crash, not a power cut).
    :ivar session_ttl_s: default TTL of sessions (None: no expiry).
    :ivar maintenance_s: period of the lease/TTL sweeper.
    :ivar verify_on_start: at open, decode every cold record against its checksum and check sessions
        and accounting (``tiering/cold/verify.py``); damaged records are dropped (misses) and counted in
        the cold tier's ``checksum_failures``. O(stored bytes): minutes for a large store.
    :ivar remote: a :class:`~tiering.remote.RemoteConfig`: a remote tier (Redis Cluster) below the cold
        tier, shared with other hosts (``tiering/fleet.py``); ``None``: none.
    """

    data_dir: str = "./kvtier-data"
    hot_device: str = "auto"
    hot_capacity: int = 4 * GiB
    warm_capacity: int = 2 * GiB
    warm_pin: str = "auto"
    warm_reserve: int = 64 << 20
    cold_enabled: bool = True
    cold_capacity: int = 16 * GiB
    policy: str = "lru"
    write_policy: str = "write_through"
    zstd_level: int = 3
    codec: str = "blosc2_zstd"
    min_tokens: int = 0
    lease_s: float = 30.0
    writer_batch: int = 64
    compress_threads: int = 2
    prefetch_threads: int = 2
    durable_sync: bool = True
    session_ttl_s: float | None = None
    maintenance_s: float = 1.0
    verify_on_start: bool = False
    remote: Any = None

    def validate(self) -> "StoreConfig":
        """Check the values; returns ``self``.

        :raises ValueError: naming the bad field and what it accepts.
        """
        if self.write_policy not in ("write_through", "write_back"):
            raise ValueError(f"write_policy must be write_through or write_back, not {self.write_policy!r}")
        if self.policy not in ("lru", "s3fifo"):
            raise ValueError(f"policy must be lru or s3fifo, not {self.policy!r}")
        if self.codec not in ("blosc2_zstd", "shuffle_zstd", "zstd", "raw"):
            raise ValueError(f"codec must be blosc2_zstd, shuffle_zstd, zstd or raw, not {self.codec!r}")
        for name in ("hot_capacity", "warm_capacity", "warm_reserve", "cold_capacity", "min_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if not -7 <= self.zstd_level <= 22:
            raise ValueError("zstd_level must be in -7..22")
        if self.lease_s <= 0 or self.writer_batch < 1 or self.compress_threads < 1 or self.prefetch_threads < 1:
            raise ValueError("lease_s, writer_batch, compress_threads and prefetch_threads must be positive")
        return self
