"""ClusterLink: the remote tier's connection to a Redis Cluster, and per-node pipelined exchanges on it.

redis-py's ``RedisCluster`` (hiredis parser) keeps the topology (slot → node) and one connection pool
per node; :meth:`ClusterLink.exchange` sends one pipeline per node on ONE pooled connection of that
node (so a trailing ``WAIT`` covers exactly the writes before it), all nodes first, then reads the
replies with a deadline. Imports redis-py and the remote config only.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from redis import exceptions as rex
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from .config import RemoteConfig, parse_address


def error_kind(exc: BaseException) -> str:
    """A short, stable name of a remote failure (used in counters, spans and logs; never a key)."""
    for cls, kind in ((rex.MovedError, "moved"), (rex.AskError, "ask"), (rex.TryAgainError, "tryagain"),
                      (rex.ClusterDownError, "clusterdown"), (rex.BusyLoadingError, "loading"),
                      (rex.ReadOnlyError, "readonly"), (rex.OutOfMemoryError, "oom"),
                      (rex.AuthenticationError, "auth"), (rex.NoPermissionError, "auth"),
                      (rex.TimeoutError, "timeout"), (rex.ConnectionError, "connection"),
                      (rex.ResponseError, "response")):
        if isinstance(exc, cls):
            return kind
    if isinstance(exc, (rex.RedisClusterException, rex.SlotNotCoveredError)):
        return "topology"
    return "client"


#: seconds between two attempts to connect to a cluster that was unreachable
CONNECT_RETRY_S = 1.0
#: failures that a topology refresh may cure (the slot moved, a master died or was demoted)
REFRESH_KINDS = frozenset({"moved", "ask", "readonly", "clusterdown", "connection", "timeout", "topology"})
#: failures worth a retry after a backoff (an asynchronous write, a durable write within its deadline)
RETRY_KINDS = REFRESH_KINDS | {"tryagain", "loading"}


@dataclass(slots=True)
class NodeExchange:
    """What one node answered: ``replies`` (values or ``ResponseError`` instances, one per command) or
    ``error`` (the whole pipeline failed); ``start_ns``/``end_ns`` bound the exchange (for spans)."""

    address: str
    replies: list | None
    error: BaseException | None
    start_ns: int
    end_ns: int


class ClusterLink:
    """Thread-safe. Connects lazily (a cluster that is down at startup does not stop kvtier).

    :param config: the remote tier's configuration.
    """

    def __init__(self, config: RemoteConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._cluster: RedisCluster | None = None
        self._last_refresh = 0.0
        self._connect_failed = -1e18
        self._refresh_wanted = threading.Event()
        self._closed = False
        self._refresher: threading.Thread | None = None

    def _client(self) -> RedisCluster:
        cluster = self._cluster
        if cluster is not None:
            return cluster
        with self._lock:
            if self._closed:
                raise rex.ConnectionError("the remote tier is closed")
            if self._cluster is None:
                # one thread a second pays the connect timeouts of an unreachable cluster; the rest fail fast
                if time.monotonic() - self._connect_failed < CONNECT_RETRY_S:
                    raise rex.ConnectionError("remote cluster unreachable (connecting again shortly)")
                nodes = [ClusterNode(*parse_address(s)) for s in self._config.seeds]
                try:
                    self._cluster = RedisCluster(startup_nodes=nodes, **self._config.cluster_kwargs())
                except (rex.RedisError, rex.RedisClusterException, OSError):
                    self._connect_failed = time.monotonic()
                    raise
            return self._cluster

    @staticmethod
    def slot(name: bytes) -> int:
        return key_slot(name)

    def route(self, name: bytes) -> ClusterNode:
        """The master serving ``name``'s slot, per the cached topology.

        :raises redis.exceptions.RedisError: if the cluster cannot be reached or the slot is uncovered.
        """
        return self._client().get_node_from_key(name)

    def node_at(self, host: str, port: int) -> ClusterNode:
        """The node at ``host:port`` (one an ``ASK`` reply named), known to the topology or not."""
        return self._client().get_node(host=host, port=port) or ClusterNode(host, port)

    def refresh(self, min_interval_s: float = 0.2) -> None:
        """Reload the topology (at most once per ``min_interval_s``); failures are left to the next call."""
        with self._lock:
            now = time.monotonic()
            if now - self._last_refresh < min_interval_s:
                return
            self._last_refresh = now
            cluster = self._cluster
        try:
            if cluster is None:
                self._client()
            else:
                cluster.nodes_manager.initialize()
        except (rex.RedisError, rex.RedisClusterException, OSError):
            pass  # still unreachable: the next failure asks again

    def request_refresh(self) -> None:
        """Ask for a topology reload on the link's background thread (a reader never waits for it)."""
        with self._lock:
            if self._closed:
                return
            if self._refresher is None:
                self._refresher = threading.Thread(target=self._refresh_loop, name="kvtier-remote-topology",
                                                   daemon=True)
                self._refresher.start()
        self._refresh_wanted.set()

    def _refresh_loop(self) -> None:
        while True:
            self._refresh_wanted.wait()
            self._refresh_wanted.clear()
            if self._closed:
                return
            self.refresh()
            time.sleep(0.2)  # at most a few reloads a second, however many readers fail

    def exchange(self, batches: dict[str, tuple[ClusterNode, list[tuple]]],
                 timeout_s: float) -> dict[str, NodeExchange]:
        """Run one pipeline per node: send to every node, then read every reply, within ``timeout_s``.

        :param batches: node name → (node, commands); each command is a tuple of arguments.
        :returns: node name → :class:`NodeExchange`. Never raises for a node's failure.
        """
        deadline = time.monotonic() + timeout_s
        out: dict[str, NodeExchange] = {}
        held: list[tuple[str, object, object, int]] = []
        try:
            for name, (node, commands) in batches.items():
                start = time.time_ns()
                try:
                    pool = self._client().get_redis_connection(node).connection_pool
                    conn = pool.get_connection()
                except (rex.RedisError, rex.RedisClusterException, OSError) as exc:
                    out[name] = NodeExchange(name, None, exc, start, time.time_ns())
                    continue
                held.append((name, pool, conn, start))
                try:
                    conn.connect()
                    conn.update_current_socket_timeout(max(deadline - time.monotonic(), 0.001))
                    conn.send_packed_command(conn.pack_commands(commands))
                except (rex.RedisError, OSError) as exc:
                    conn.disconnect()
                    out[name] = NodeExchange(name, None, exc, start, time.time_ns())
            for name, _pool, conn, start in held:
                if name in out:
                    continue
                replies: list = []
                try:
                    for _ in batches[name][1]:
                        try:
                            replies.append(conn.read_response(timeout=max(deadline - time.monotonic(), 0.001)))
                        except rex.ResponseError as exc:  # an error reply: the connection stays in step
                            replies.append(exc)
                    out[name] = NodeExchange(name, replies, None, start, time.time_ns())
                except (rex.RedisError, OSError) as exc:
                    conn.disconnect()
                    out[name] = NodeExchange(name, None, exc, start, time.time_ns())
        finally:
            for name, pool, conn, _start in held:
                if name not in out:  # interrupted mid-reply: the connection is out of step
                    conn.disconnect()
                conn.update_current_socket_timeout(-1)
                pool.release(conn)
        return out

    def close(self) -> None:
        with self._lock:
            self._closed = True
            cluster, self._cluster = self._cluster, None
            refresher = self._refresher
        self._refresh_wanted.set()
        if refresher is not None:
            refresher.join(5.0)
        if cluster is not None:
            cluster.close()
