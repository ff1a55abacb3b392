"""RemoteConfig: how kvtier reaches its Redis Cluster (seeds, auth, TLS, keys, TTL, timeouts, writes, breaker).

A frozen value; imports only the standard library. ``cluster_kwargs`` turns it into redis-py arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: ``off``: never write; ``durable``: write only what a ``durable=True`` call asks (synchronously, with
#: WAIT); ``all``: also write every other block and session, asynchronously, off the caller's path.
WRITE_MODES = ("off", "durable", "all")
MiB = 1 << 20


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) → ``(host, port)``.

    :raises ValueError: on a missing or invalid port.
    """
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"remote seed {text!r} is not host:port")
    return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class RemoteConfig:
    """Configuration of the remote tier. Every field has a working default except ``seeds``.

    :ivar seeds: ``host:port`` of one or more cluster nodes (the rest are discovered).
    :ivar username, password: Redis ACL credentials (``None``: no AUTH). The password is never in ``repr``.
    :ivar tls, tls_ca, tls_cert, tls_key: TLS on/off, CA bundle, client certificate and key (paths).
    :ivar key_prefix: prepended to every key; must not contain ``{`` or ``}`` (hash tags are ours).
    :ivar ttl_s: every key written gets this TTL; a read hit refreshes it.
    :ivar base_timeout_s, min_throughput_bps: an operation moving N bytes may take
        ``base_timeout_s + N / min_throughput_bps`` seconds (connect, send and every reply).
    :ivar max_part_bytes: largest value stored under one key; bigger records are split into parts.
    :ivar max_inflight_bytes: bytes of queued asynchronous writes plus running durable writes.
    :ivar write: one of :data:`WRITE_MODES`.
    :ivar min_replicas: replicas that must acknowledge (``WAIT``) a durable write; 0 skips ``WAIT``.
    :ivar breaker_failures: consecutive failed or slow operations (taking longer than ``slow_budget_s +
        bytes / min_throughput_bps``) that open the circuit breaker; ``breaker_cooldown_s`` later one
        probe is let through (half-open).
    :ivar write_retries: attempts after the first for an asynchronous write; writes of at least
        ``large_write_bytes`` get one retry at most.
    :ivar max_connections: connections per cluster node.
    """

    seeds: tuple[str, ...]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    key_prefix: str = "kvtier:"
    ttl_s: float = 7 * 86400.0
    base_timeout_s: float = 0.25
    min_throughput_bps: float = 50.0 * MiB
    max_part_bytes: int = 4 * MiB
    max_inflight_bytes: int = 256 * MiB
    write: str = "durable"
    min_replicas: int = 1
    breaker_failures: int = 5
    breaker_cooldown_s: float = 2.0
    slow_budget_s: float = 2.0
    write_retries: int = 3
    large_write_bytes: int = 8 * MiB
    max_connections: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.seeds, str) or not self.seeds:
            raise ValueError("remote.seeds must list at least one host:port")
        object.__setattr__(self, "seeds", tuple(self.seeds))
        for seed in self.seeds:
            parse_address(seed)
        if "{" in self.key_prefix or "}" in self.key_prefix:
            raise ValueError("remote.key_prefix must not contain '{' or '}' (they mark Redis hash tags)")
        if self.write not in WRITE_MODES:
            raise ValueError(f"remote.write must be one of {', '.join(WRITE_MODES)}")
        if self.max_part_bytes < 4096:
            raise ValueError("remote.max_part_bytes must be at least 4096")
        if self.ttl_s <= 0 or self.base_timeout_s <= 0 or self.min_throughput_bps <= 0:
            raise ValueError("remote ttl, base timeout and minimum throughput must be positive")
        if self.min_replicas < 0 or self.breaker_failures < 1 or self.write_retries < 0:
            raise ValueError("remote.min_replicas >= 0, breaker_failures >= 1, write_retries >= 0")

    def timeout(self, nbytes: int) -> float:
        """Seconds an operation moving ``nbytes`` may take: base + bytes ÷ minimum throughput."""
        return self.base_timeout_s + nbytes / self.min_throughput_bps

    @property
    def ttl_ms(self) -> int:
        return max(1, int(self.ttl_s * 1000))

    def retries_for(self, nbytes: int) -> int:
        """Retries an asynchronous write of ``nbytes`` gets (few for multi-MB writes)."""
        return min(1, self.write_retries) if nbytes >= self.large_write_bytes else self.write_retries

    def cluster_kwargs(self) -> dict:
        """Keyword arguments of ``redis.cluster.RedisCluster`` (startup nodes excluded)."""
        kw: dict = {"socket_timeout": self.base_timeout_s, "socket_connect_timeout": self.base_timeout_s,
                    "require_full_coverage": False, "max_connections": self.max_connections,
                    "decode_responses": False}
        if self.username is not None:
            kw["username"] = self.username
        if self.password is not None:
            kw["password"] = self.password
        if self.tls:
            kw.update(ssl=True, ssl_ca_certs=self.tls_ca, ssl_certfile=self.tls_cert, ssl_keyfile=self.tls_key)
        return kw
