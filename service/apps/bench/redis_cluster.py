"""A real Redis Cluster of local ``redis-server`` processes (3 masters + 3 replicas by default), with faults.

Used by ``kvtier bench --scenarios fleet`` and by the tests' ``redis_cluster`` fixture. Imports only the
standard library and redis-py. Every wait is bounded; every process is stopped by its PID.
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.crc import key_slot

HOST = "127.0.0.1"
#: how long a node may take to fail over in these clusters (kept short: tests wait for it)
NODE_TIMEOUT_MS = 1500


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port_pair(rng: random.Random) -> int:
    """A port P with P and its cluster-bus port P+10000 both free now."""
    for _ in range(200):
        port = rng.randrange(20000, 45000)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair found for a redis-server")


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the test process dies without stopping it (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def wait_until(what: str, check: Callable[[], bool], timeout: float = 20.0, step: float = 0.05) -> None:
    """Poll ``check`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(step)
    raise TimeoutError(f"redis cluster: {what} not reached within {timeout:.0f} s (last error: {last})")


@dataclass
class RedisNode:
    """One ``redis-server`` process of the cluster."""

    port: int
    dir: Path
    proc: subprocess.Popen | None = None
    paused: bool = False

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def admin(self, timeout: float = 2.0) -> redis.Redis:
        """A plain (non-cluster) client of this node, for admin commands."""
        return redis.Redis(host=HOST, port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout)


@dataclass
class LocalRedisCluster:
    """A Redis Cluster of ``masters`` × (1 + ``replicas``) local processes under ``root``.

    Not thread-safe (test code drives it from one thread). :meth:`stop` is idempotent.
    """

    root: Path
    masters: int = 3
    replicas: int = 1
    nodes: list[RedisNode] = field(default_factory=list)

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> "LocalRedisCluster":
        """Start the processes, create the cluster, wait until it is ok. Stops everything on failure."""
        rng = random.Random()
        try:
            for i in range(self.masters * (1 + self.replicas)):
                port = free_port_pair(rng)
                node = RedisNode(port, self.root / f"node-{port}")
                node.dir.mkdir(parents=True)
                self.nodes.append(node)
                self._spawn(node)
            for node in self.nodes:
                wait_until(f"{node.address} answering PING", lambda n=node: n.admin().ping(), timeout)
            cli = shutil.which("redis-cli") or "redis-cli"
            subprocess.run([cli, "--cluster", "create", *[n.address for n in self.nodes],
                            "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                           check=True, capture_output=True, timeout=timeout)
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, node: RedisNode) -> None:
        args = [shutil.which("redis-server") or "redis-server", "--port", str(node.port), "--bind", HOST,
                "--dir", str(node.dir), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--cluster-replica-validity-factor", "0",
                "--cluster-allow-replica-migration", "no", "--appendonly", "yes", "--save", "",
                "--protected-mode", "no", "--daemonize", "no", "--repl-diskless-sync", "yes",
                "--repl-diskless-sync-delay", "0", "--logfile", str(node.dir / "redis.log")]
        node.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        node.paused = False

    def stop(self) -> None:
        """Kill every process by its PID (continuing paused ones first) and reap it."""
        for node in self.nodes:
            if node.alive():
                try:
                    os.kill(node.pid, signal.SIGCONT)
                    os.kill(node.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass

    # ---- topology --------------------------------------------------------------------------------
    @property
    def seeds(self) -> list[str]:
        """``host:port`` of every node (what a client is configured with)."""
        return [n.address for n in self.nodes]

    def node(self, port: int) -> RedisNode:
        return next(n for n in self.nodes if n.port == port)

    def _live(self) -> list[RedisNode]:
        return [n for n in self.nodes if n.alive() and not n.paused]

    def slot_ranges(self) -> list[tuple[int, int, list[int]]]:
        """``(first slot, last slot, [master port, replica ports…])`` as a live node sees them now."""
        rows = self._live()[0].admin().execute_command("CLUSTER", "SLOTS")
        return [(int(r[0]), int(r[1]), [int(n[1]) for n in r[2:]]) for r in rows]

    def master_of_slot(self, slot: int) -> int:
        """Port of the master serving ``slot`` now."""
        for lo, hi, ports in self.slot_ranges():
            if lo <= slot <= hi:
                return ports[0]
        raise KeyError(f"slot {slot} is not covered")

    def master_of_key(self, key: bytes | str) -> int:
        """Port of the master serving ``key``'s slot (hash tags honoured)."""
        return self.master_of_slot(key_slot(key.encode() if isinstance(key, str) else key))

    def masters_now(self) -> list[int]:
        return sorted({ports[0] for _, _, ports in self.slot_ranges()})

    def replicas_of(self, master_port: int, *, online: bool = False) -> list[int]:
        """Ports of the replicas attached to ``master_port`` (only those in sync when ``online``)."""
        info = self.node(master_port).admin().info("replication")
        return [int(v["port"]) for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                and (not online or v.get("state") == "online")]

    def node_id(self, port: int) -> str:
        """The cluster node id of ``port``."""
        raw = self.node(port).admin().execute_command("CLUSTER", "MYID")
        return raw.decode() if isinstance(raw, bytes) else raw

    def reshard(self, src: int, dst: int, slots: int, timeout: float = 120.0) -> None:
        """Move ``slots`` slots (and their keys) from master ``src`` to master ``dst`` with
        ``redis-cli --cluster reshard``; blocks until done (run it in a thread to overlap traffic)."""
        cli = shutil.which("redis-cli") or "redis-cli"
        subprocess.run([cli, "--cluster", "reshard", self.node(src).address, "--cluster-from", self.node_id(src),
                        "--cluster-to", self.node_id(dst), "--cluster-slots", str(slots), "--cluster-yes",
                        "--cluster-pipeline", "4"], check=True, capture_output=True, timeout=timeout)

    # ---- faults ----------------------------------------------------------------------------------
    def kill(self, port: int) -> None:
        """SIGKILL one node and reap it."""
        node = self.node(port)
        if node.alive():
            os.kill(node.pid, signal.SIGCONT)
            os.kill(node.pid, signal.SIGKILL)
            node.proc.wait(timeout=10)
        node.paused = False

    def pause(self, port: int) -> None:
        """SIGSTOP one node: it keeps its sockets but answers nothing."""
        node = self.node(port)
        os.kill(node.pid, signal.SIGSTOP)
        node.paused = True

    def resume(self, port: int) -> None:
        """SIGCONT a paused node."""
        node = self.node(port)
        if node.alive():
            os.kill(node.pid, signal.SIGCONT)
        node.paused = False

    def restart(self, port: int, timeout: float = 20.0) -> None:
        """Start a killed node again on its port and data dir (it rejoins from its nodes.conf)."""
        node = self.node(port)
        if not node.alive():
            self._spawn(node)
        wait_until(f"{node.address} answering PING after restart", lambda: node.admin().ping(), timeout)

    def failover(self, replica_port: int, timeout: float = 20.0) -> None:
        """``CLUSTER FAILOVER`` on a replica; waits until it is a master."""
        self.node(replica_port).admin().execute_command("CLUSTER", "FAILOVER")
        wait_until(f"{replica_port} promoted", lambda: self.node(replica_port).admin().info("replication")["role"]
                   == "master", timeout)

    def wait_failover(self, dead_master: int, slot: int, timeout: float = 30.0) -> int:
        """Wait until ``slot`` is served by a master other than ``dead_master``; its port."""
        result: list[int] = []

        def moved() -> bool:
            port = self.master_of_slot(slot)
            if port != dead_master and self.node(port).admin().info("replication")["role"] == "master":
                result.append(port)
                return True
            return False

        wait_until(f"failover of slot {slot} away from {dead_master}", moved, timeout, step=0.1)
        return result[-1]

    # ---- settings and data -----------------------------------------------------------------------
    def config_set(self, name: str, value: str | int, ports: list[int] | None = None) -> None:
        """``CONFIG SET`` on the given nodes (default: every live node)."""
        for node in ([self.node(p) for p in ports] if ports else self._live()):
            node.admin().config_set(name, value)

    def set_maxmemory(self, nbytes: int, policy: str = "noeviction") -> None:
        """maxmemory (0 = unlimited) and maxmemory-policy on every live node."""
        self.config_set("maxmemory-policy", policy)
        self.config_set("maxmemory", nbytes)

    def flush(self) -> None:
        """FLUSHALL on every master."""
        for port in self.masters_now():
            self.node(port).admin().flushall()

    def dbsize(self) -> int:
        return sum(self.node(p).admin().dbsize() for p in self.masters_now())

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """cluster_state:ok on every live node, each master with ``replicas`` online replica(s)."""
        def ok() -> bool:
            live = self._live()
            if any(n.admin().cluster("info")["cluster_state"] != "ok" for n in live):
                return False
            masters = self.masters_now()
            if len(masters) != self.masters or any(len(self.replicas_of(m, online=True)) < self.replicas
                                                   for m in masters):
                return False
            # the replica's side too: its link is up only once it has loaded the master's snapshot
            if not all(n.admin().info("replication").get("master_link_status", "up") == "up" for n in live):
                return False
            return all(self._acks_writes(m) for m in masters)

        wait_until("cluster_state:ok with every replica attached", ok, timeout, step=0.1)

    def _acks_writes(self, master: int) -> bool:
        """A probe write on ``master`` acknowledged by ``replicas`` replicas (WAIT), then removed."""
        ranges = [(lo, hi) for lo, hi, ports in self.slot_ranges() if ports[0] == master]
        probe = next(f"probe-{i}" for i in range(100000)
                     if any(lo <= key_slot(f"probe-{i}".encode()) <= hi for lo, hi in ranges))
        conn = self.node(master).admin()
        pipe = conn.pipeline(transaction=False)
        pipe.set(probe, b"1", px=60000).execute_command("WAIT", self.replicas, 1000).delete(probe)
        return pipe.execute()[1] >= self.replicas

    def heal(self, timeout: float = 40.0) -> None:
        """Undo faults: continue paused nodes, restart dead ones, reset memory limits, wait healthy."""
        for node in self.nodes:
            if node.paused:
                self.resume(node.port)
            if not node.alive():
                self.restart(node.port)
        self.set_maxmemory(0, "noeviction")
        self.wait_healthy(timeout)


def redis_installed() -> bool:
    """Whether ``redis-server`` and ``redis-cli`` are on PATH."""
    return bool(shutil.which("redis-server") and shutil.which("redis-cli"))
