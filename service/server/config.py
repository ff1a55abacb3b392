"""Settings of the kvtier server: one pydantic object, four sections, loaded from flags, env and TOML.

Every value comes from, highest precedence first:

1. command-line flags (``kvtier serve --warm-capacity 4GiB``), passed to :meth:`Settings.load`;
2. environment variables ``KVTIER_<SECTION>__<FIELD>`` (``KVTIER_STORE__WARM_CAPACITY=4GiB``,
   ``KVTIER_SERVER__PORT=6000``, ``KVTIER_LOG_LEVEL=debug``); dict and list fields take JSON
   (``KVTIER_SECURITY__TOKENS='{"tok": "acme"}'``);
3. a TOML file named by ``--config FILE`` or ``KVTIER_CONFIG`` (sections ``[server]``, ``[store]``,
   ``[telemetry]``, ``[security]``, ``[remote]``, and ``log_level``/``log_format`` at the top);
4. the defaults below.

Unknown names are errors, never silently ignored: a TOML section or field, or a ``KVTIER_*`` variable
shaped like a setting (``KVTIER_<X>__<Y>``, ``KVTIER_STORE_<...>``, or a name close to a top-level
setting). Other ``KVTIER_*`` variables (``KVTIER_CONFIG``, ``KVTIER_COLD_KEY``, tools' own ones such
as ``KVTIER_STRESS``) are left alone. Every problem is one :class:`SettingsError` line naming the
setting, where its value came from (``env KVTIER_...``, ``file.toml:LINE``, ``--flag``) and, for an
unknown name, the closest valid one (the layers: ``config_sources.py``). Callers see ``SettingsError``.

Byte sizes accept integers or human strings: ``"2GiB"``, ``"512MiB"``, ``"1.5 GB"`` (pydantic
``ByteSize``: ``KiB/MiB/GiB`` are powers of 1024, ``KB/MB/GB`` powers of 1000).
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, SecretStr, ValidationError, field_validator

from kvtier.service.server.config_sources import SettingsError, Sources, describe
from kvtier.tiering.config import StoreConfig
from kvtier.tiering.lossy_spec import parse_spec
from kvtier.tiering.remote import RemoteConfig

#: Env var naming the TOML file when ``--config`` is not given.
CONFIG_ENV = "KVTIER_CONFIG"
#: ``KVTIER_*`` variables that are read elsewhere, not settings.
OTHER_ENV = {CONFIG_ENV: "the TOML settings file", "KVTIER_COLD_KEY": "the cold tier's key (tiering/crypto.py)"}
ENV_PREFIX = "KVTIER_"

_STRICT = ConfigDict(extra="forbid")



class ServerSettings(BaseModel):
    """Where and how the gRPC server listens.

    :ivar host: address to bind (``0.0.0.0`` or ``::`` for every interface).
    :ivar port: TCP port; 0 picks a free one (see ``port_file``).
    :ivar max_message_bytes: largest gRPC message accepted or sent; bigger ones fail with
        RESOURCE_EXHAUSTED. Block chunks are at most 1 MiB, so a few MiB is plenty.
    :ivar max_concurrent_rpcs: KVCache RPCs served at once; more are refused with RESOURCE_EXHAUSTED
        (``QuotaFailure`` ``server:concurrent_rpcs``). Health checks and reflection are not counted.
    :ivar max_open_puts_per_tenant: Put streams one tenant may have open at once (0 = no limit); keep
        it below ``max_concurrent_rpcs`` so idle half-open streams of one caller leave room for others.
    :ivar put_pending_bytes: payload bytes the headers of all open Put streams may declare together
        (0 = no limit); a header over it is refused with RESOURCE_EXHAUSTED. Memory follows the bytes
        that arrive, so this bounds what a few small headers can commit the server to.
    :ivar stream_idle_s: seconds a Put stream may send nothing before it is closed (DEADLINE_EXCEEDED,
        nothing stored); 0 = wait for ever (only the caller's deadline applies).
    :ivar max_put_bytes: payload bytes one Put stream may declare (its blocks' sizes from the header's
        layout, first_block and block_count). A Put is buffered whole before it is stored, so this
        bounds the memory one stream can take; a larger one is refused with RESOURCE_EXHAUSTED before
        any chunk is read. At least 1 GiB, the largest block a layout allows.
    :ivar grace_s: on SIGTERM/SIGINT, seconds in-flight RPCs get to finish before they are cancelled.
    :ivar port_file: if set, the bound port is written there (as text) once the server listens.
    :ivar shm_enabled: offer same-host callers the shared-memory data path (``OpenArena``,
        ``PutShm``, ``GetShm``; ``service/shm``). Off: those RPCs answer FAILED_PRECONDITION and
        clients use the gRPC streams.
    :ivar shm_socket: Unix socket that hands arena fds to callers; unset: a fresh private (0700)
        directory under the temp dir, reachable by this uid only. Name a path to serve other uids.
    :ivar shm_arena_bytes: size of each caller's arena (committed as used, or at once with ``shm_prefault``).
        Blocks larger than an arena travel over gRPC; sessions larger than it move in pieces.
    :ivar shm_arenas_per_caller: arenas one caller may hold (its tenant with tokens, else its
        connection); 0 = no limit beyond the server's 256.
    :ivar shm_prefault: touch every page of an arena as it is handed out (on a background thread, and
        the client its own mapping): each arena's full size is committed at once, and no call pays the
        first-touch page faults of a fresh range (~1 ms per MiB on small VMs). Off (the default): memory
        is committed as ranges are first used, and many clients opening at once do not compete with
        their calls for the CPU. Turn it on for long-lived same-host clients that hold results.
    :ivar shm_control: also serve ``PutShm``/``GetShm`` as frames over each arena's Unix socket
        (``service/server/shm_control.py``), which same-host clients prefer to the gRPC unary calls.
    """

    model_config = _STRICT

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    max_message_bytes: ByteSize = Field(ByteSize(8 << 20), ge=2 << 20)
    max_concurrent_rpcs: int = Field(64, ge=1)
    max_open_puts_per_tenant: int = Field(32, ge=0)
    put_pending_bytes: ByteSize = Field(ByteSize(2 << 30), ge=0)
    stream_idle_s: float = Field(60.0, ge=0)
    max_put_bytes: ByteSize = Field(ByteSize(1 << 30), ge=1 << 30)
    grace_s: float = Field(10.0, ge=0)
    port_file: Path | None = None
    shm_enabled: bool = True
    shm_socket: Path | None = None
    shm_arena_bytes: ByteSize = Field(ByteSize(256 << 20), ge=1 << 20)
    shm_arenas_per_caller: int = Field(32, ge=0)
    shm_control: bool = True
    shm_prefault: bool = False


class StoreSettings(BaseModel):
    """The engine's knobs: one field per field of :class:`tiering.config.StoreConfig` (see there), and
    ``lossy_codecs``: tenant (``"*"``: every tenant) → the lossy cold codecs its namespaces may choose
    (``namespace.cold_codec``; ``"int4"`` allows ``"int4/g<N>"`` too), e.g. ``{"acme" = ["fp8_e4m3"]}``.
    Empty (the default): no tenant may store lossy blocks."""

    model_config = _STRICT

    data_dir: Path = Path("./kvtier-data")
    hot_device: str = "auto"
    hot_capacity: ByteSize = ByteSize(4 << 30)
    warm_capacity: ByteSize = ByteSize(2 << 30)
    warm_pin: Literal["auto", "on", "off"] = "auto"
    warm_reserve: ByteSize = ByteSize(64 << 20)
    cold_enabled: bool = True
    cold_capacity: ByteSize = ByteSize(16 << 30)
    policy: Literal["lru", "s3fifo"] = "lru"
    write_policy: Literal["write_through", "write_back"] = "write_through"
    zstd_level: int = Field(3, ge=-7, le=22)
    codec: Literal["blosc2_zstd", "shuffle_zstd", "zstd", "raw"] = "blosc2_zstd"
    min_tokens: int = Field(0, ge=0)
    lease_s: float = Field(30.0, gt=0)
    writer_batch: int = Field(64, ge=1)
    compress_threads: int = Field(2, ge=1)
    prefetch_threads: int = Field(2, ge=1)
    durable_sync: bool = True
    session_ttl_s: float | None = Field(None, gt=0)
    maintenance_s: float = Field(1.0, gt=0)
    verify_on_start: bool = False
    lossy_codecs: dict[str, list[str]] = {}

    @field_validator("lossy_codecs")
    @classmethod
    def _known_codecs(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for names in value.values():
            for name in names:
                parse_spec(name)  # ValueError names the choices
        return value

    def to_store_config(self) -> StoreConfig:
        """The validated :class:`StoreConfig` these settings describe.

        :raises ValueError: if the engine rejects a value.
        """
        values = {f.name: getattr(self, f.name) for f in fields(StoreConfig) if f.name != "remote"}
        values["data_dir"] = str(self.data_dir)
        for name in ("hot_capacity", "warm_capacity", "warm_reserve", "cold_capacity"):
            values[name] = int(values[name])
        return StoreConfig(**values).validate()


class TelemetrySettings(BaseModel):
    """Traces and metrics (``service/server/telemetry.py``).

    :ivar traces: export OpenTelemetry spans (needs ``otlp_endpoint``).
    :ivar otlp_endpoint: OTLP collector, e.g. ``http://127.0.0.1:4317``.
    :ivar otlp_protocol: ``grpc`` (port 4317) or ``http`` (port 4318).
    :ivar metrics_port: Prometheus ``/metrics`` port; 0 switches the exporter off.
    :ivar metrics_host: address the metrics endpoint binds.
    :ivar service_name: ``service.name`` resource attribute.
    :ivar sample_ratio: share of *root* traces kept (0..1). The sampler is parent-based: a request
        whose caller sampled its trace is always traced, one whose caller did not never is, and a
        request without a caller's trace starts a new one with this probability. The default 0.1
        keeps tracing's cost on the data path within a few percent (``kvtier bench``'s tracing row);
        ``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG`` win when set.
    """

    model_config = _STRICT

    traces: bool = False
    otlp_endpoint: str | None = None
    otlp_protocol: Literal["grpc", "http"] = "grpc"
    metrics_port: int = Field(0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    service_name: str = "kvtier"
    sample_ratio: float = Field(0.1, ge=0, le=1)


class SecuritySettings(BaseModel):
    """Authentication, transport security, limits and encryption at rest (``service/server/auth.py``,
    ``service/server/tls.py``, ``service/server/quota.py``, ``tiering/crypto.py``).

    :ivar tokens: bearer token → tenant (env: ``KVTIER_SECURITY__TOKENS='{"tok": "acme"}'``). Prefer
        ``tokens_file`` so secrets stay out of the environment.
    :ivar tokens_file: JSON (``*.json``) or TOML file ``{"tokens": {...}, "admin_tokens": [...]}``,
        merged with ``tokens``/``admin_tokens``.
    :ivar admin_tokens: tokens allowed to call admin RPCs (Stats) and to act for any tenant.
    :ivar allow_insecure_remote: without tokens, listen on a non-loopback address anyway.
    :ivar tls_cert: PEM server certificate (chain); with ``tls_key`` the listener speaks TLS only.
    :ivar tls_key: PEM private key of ``tls_cert``.
    :ivar tls_client_ca: PEM CA bundle; set: mutual TLS, clients must present a certificate it signed.
    :ivar cold_key_file: file with the 32-byte AES-256-GCM key (hex or base64) encrypting the cold
        tier; else ``$KVTIER_COLD_KEY``; neither: no encryption. To rotate, list several keys, one a
        line as ``ID:KEY`` (ID 0..127; a bare KEY is id 0): the first seals new records, every one
        listed opens its id's records (``tiering/crypto.py``).
    :ivar max_blocks_per_request: blocks one Put/Lookup/Get/Prefetch may name (0 = no limit).
    :ivar tenant_memory_bytes: bytes one tenant may hold in hot + warm (0 = no limit).
    :ivar tenant_cold_bytes: bytes one tenant may hold in the cold tier (0 = no limit).
    :ivar max_sessions_per_tenant: sessions one tenant may have (0 = no limit).
    """

    model_config = _STRICT

    tokens: dict[str, str] = Field(default_factory=dict, repr=False)
    tokens_file: Path | None = None
    admin_tokens: list[str] = Field(default_factory=list, repr=False)
    allow_insecure_remote: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    cold_key_file: Path | None = None
    max_blocks_per_request: int = Field(0, ge=0)
    tenant_memory_bytes: ByteSize = Field(ByteSize(0), ge=0)
    tenant_cold_bytes: ByteSize = Field(ByteSize(0), ge=0)
    max_sessions_per_tenant: int = Field(0, ge=0)


class RemoteSettings(BaseModel):
    """The remote tier: a Redis Cluster (or Valkey, Kvrocks, a managed Redis-compatible service) shared by
    a fleet of kvtier nodes, below the cold tier (``tiering/remote``, ``tiering/fleet.py``). Off while
    ``seeds`` is empty.

    :ivar seeds: ``host:port`` of one or more cluster nodes (env: ``KVTIER_REMOTE__SEEDS='["h:7000"]'``).
    :ivar username: Redis ACL user. :ivar password: its password (env ``KVTIER_REMOTE__PASSWORD``);
        prefer ``password_file`` (first line of the file), which wins when both are set.
    :ivar tls, tls_ca, tls_cert, tls_key: TLS to the cluster, its CA bundle, a client certificate and key.
    :ivar key_prefix: prefix of every key kvtier writes. :ivar ttl_s: TTL of every key (refreshed on a hit).
    :ivar write: ``off`` (read only), ``durable`` (only ``durable=true`` puts, synchronously, acknowledged
        by ``min_replicas`` replicas) or ``all`` (also every other commit, asynchronously).
    :ivar min_replicas: replicas that must acknowledge a durable write (Redis ``WAIT``); 0: the primary only.
    :ivar max_part_bytes: largest value under one key; bigger records are split into parts.
    The other fields are :class:`~tiering.remote.RemoteConfig`'s timeouts, write queue and circuit breaker.
    """

    model_config = _STRICT

    seeds: list[str] = Field(default_factory=list)
    username: str | None = None
    password: SecretStr | None = Field(None, repr=False)
    password_file: Path | None = None
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    key_prefix: str = "kvtier:"
    ttl_s: float = Field(7 * 86400.0, gt=0)
    write: Literal["off", "durable", "all"] = "durable"
    min_replicas: int = Field(1, ge=0)
    max_part_bytes: ByteSize = Field(ByteSize(4 << 20), ge=4096)
    max_inflight_bytes: ByteSize = Field(ByteSize(256 << 20), ge=1 << 20)
    base_timeout_s: float = Field(0.25, gt=0)
    min_throughput_bps: ByteSize = Field(ByteSize(50 << 20), gt=0)
    slow_budget_s: float = Field(2.0, gt=0)
    breaker_failures: int = Field(5, ge=1)
    breaker_cooldown_s: float = Field(2.0, gt=0)
    write_retries: int = Field(3, ge=0)
    large_write_bytes: ByteSize = Field(ByteSize(8 << 20), ge=0)
    max_connections: int = Field(64, ge=1)

    def to_remote_config(self) -> RemoteConfig | None:
        """The engine's :class:`RemoteConfig`, or ``None`` when ``seeds`` is empty (no remote tier).

        :raises ValueError: on a bad seed or key prefix; :raises OSError: if ``password_file`` is unreadable.
        """
        if not self.seeds:
            return None
        password = self.password.get_secret_value() if self.password is not None else None
        if self.password_file is not None:
            lines = self.password_file.read_text().splitlines()
            password = lines[0].strip() if lines else ""
        paths = {n: str(getattr(self, n)) if getattr(self, n) is not None else None
                 for n in ("tls_ca", "tls_cert", "tls_key")}
        sizes = {n: int(getattr(self, n)) for n in ("max_part_bytes", "max_inflight_bytes", "large_write_bytes")}
        plain = {n: getattr(self, n) for n in ("username", "tls", "key_prefix", "ttl_s", "write", "min_replicas",
                                                "base_timeout_s", "slow_budget_s", "breaker_failures",
                                                "breaker_cooldown_s", "write_retries", "max_connections")}
        return RemoteConfig(seeds=tuple(self.seeds), password=password,
                            min_throughput_bps=float(self.min_throughput_bps), **paths, **sizes, **plain)


class Settings(BaseModel):
    """Everything the server needs. Build it with :meth:`load` (which applies the precedence);
    ``Settings(...)`` itself reads no environment or file.

    :ivar log_level: ``DEBUG``, ``INFO``, ``WARNING``, ``ERROR`` or ``CRITICAL``, any case.
    :ivar log_format: ``text`` (one line with ``trace_id``/``span_id``) or ``json`` (one JSON object a
        line: ``time``, ``level``, ``logger``, ``message``, ``trace_id``, ``span_id``).
    """

    model_config = _STRICT

    server: ServerSettings = ServerSettings()
    store: StoreSettings = StoreSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    security: SecuritySettings = SecuritySettings()
    remote: RemoteSettings = RemoteSettings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _any_case(cls, value: Any, info) -> Any:
        if not isinstance(value, str):
            return value
        return value.upper() if info.field_name == "log_level" else value.lower()

    def store_config(self) -> StoreConfig:
        """The engine's config: ``[store]`` with the ``[remote]`` tier when one is configured.

        :raises ValueError: if the engine rejects a value.
        """
        cfg = self.store.to_store_config()
        cfg.remote = self.remote.to_remote_config()
        return cfg

    @classmethod
    def load(cls, config_file: str | os.PathLike | None = None, **overrides: Any) -> "Settings":
        """Settings from flags, env, TOML file and defaults, in that order of precedence.

        :param config_file: TOML file; defaults to ``$KVTIER_CONFIG`` when unset.
        :param overrides: the flags given, as nested dicts (``store={"warm_capacity": "4GiB"}``) or a
            top-level ``log_level``; ``None`` values are ignored (flag not given).
        :raises SettingsError: on a missing or unparsable TOML file, an unknown name or an invalid
            value (module docstring); the message is one line.
        """
        sources = Sources(cls, ENV_PREFIX, OTHER_ENV)
        path = config_file or os.environ.get(CONFIG_ENV) or None
        merged, origin = sources.layers(Path(path) if path is not None else None, os.environ, overrides)
        try:
            return cls.model_validate(merged)
        except ValidationError as exc:
            raise SettingsError(describe(exc, origin)) from None
