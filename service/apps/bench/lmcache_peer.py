"""``kvtier bench --peers lmcache``: kvtier and LMCache, its closest peer, on the same workloads in one run.

Systems and paths, one row each per workload and operation:

* ``kvtier/grpc``: a kvtier server (warm tier, host RAM) and :class:`service.client.KVTierClient`,
  blocks streamed in 1 MiB chunks over gRPC;
* ``kvtier/shm``: the same-host shared-memory data path (``service/shm``, ``data_path="shm"``);
* ``lmcache/zmq`` and ``lmcache/grpc``: ``lmcache server`` (L1 in host RAM) over either transport,
  driven by ``lmcache bench server``'s own client in ``lmcache_driven`` CPU mode: the client's KV
  pages are POSIX shared memory mapped by the server, so the transport carries control messages only;
* ``lmcache/tcp``: the older ``lmcache_server`` that takes the bytes themselves over one TCP socket.

Workloads (:data:`WORKLOADS`): one 256-token SmolLM2-135M chunk (5,898,240 B), one 2 MiB chunk, an
8-chunk request of 2 MiB chunks, and a resume (store a 2,048-token conversation, then get it whole;
the get includes the lookup each system needs first). Every request stores fresh random bytes and
every retrieved payload is compared with what was stored, for every system.

LMCache runs from its own virtualenv (``make lmcache-venv``; ``$KVTIER_LMCACHE_VENV`` overrides the
path): :mod:`service.bench.lmcache_driver` runs there and prints raw timings as JSON. Without that
virtualenv the scenario reports ``not measured``. Its servers listen on 127.0.0.1 only and are stopped
(their whole process group) when their rows are done, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvtier.service.client.client import KVTierClient
from kvtier.service.wire.convert import DEFAULT_TENANT
from kvtier.tiering.keys import Namespace, chain_keys
from kvtier.tiering.layout import BlockLayout

from kvtier.service.apps.bench import tiers
from kvtier.service.apps.bench.context import BenchContext, ratio, summarize
from kvtier.service.apps.bench.procs import free_port, kvtier_server
from kvtier.service.apps.bench.transport import fill_warm, put_via_buffers

#: The checkout this module lies in (service/apps/bench/ -> the repository root), when run from one.
_REPO = Path(__file__).resolve().parents[3]
DRIVER = Path(__file__).with_name("lmcache_driver.py")
VENV_ENV = "KVTIER_LMCACHE_VENV"
CHUNK_TOKENS = 256
#: L1 of the multiprocess server: it is allocated up front; 2 GiB holds every workload's live data.
L1_GB = 2
#: kvtier's server: host RAM only, a warm tier filled before the timed requests, so stores reuse evicted blocks'
#: memory as LMCache's L1 (first-touched up front) is; an empty tier faults in fresh pages (~1 ms per 2 MiB here).
KVTIER_WARM_BYTES = 1 << 30
KVTIER_SETTINGS = {**tiers.SETTINGS["warm"], "warm_capacity": str(KVTIER_WARM_BYTES), "cold_enabled": "false"}
#: kvtier data paths measured: name -> ``KVTierClient`` keyword arguments. Named explicitly: the
#: client's default (``"auto"``) would take shared memory on this host for the gRPC row too.
KVTIER_PATHS: dict[str, dict] = {"grpc": {"data_path": "grpc"}, "shm": {"data_path": "shm"}}
#: LMCache's paths: name -> (server kind, transport).
LMCACHE_PATHS: dict[str, tuple[str, str]] = {"zmq": ("mp", "zmq"), "grpc": ("mp", "grpc"), "tcp": ("tcp", "tcp")}


@dataclass(frozen=True)
class Workload:
    """One request shape, the same bytes for every system.

    :ivar layout: kvtier's block layout of one 256-token chunk.
    :ivar lmcache_spec: the ``--kvcache-shape-spec`` of the same chunk for ``lmcache server``.
    :ivar tcp_shape: the chunk as the TCP server's ``KV_2LTD`` memory object ``[2, layers, tokens, heads*dim]``.
    :ivar resume: the get names a session (kvtier) or is preceded by a lookup (LMCache), and is timed with it.
    """

    name: str
    layout: BlockLayout
    lmcache_spec: str
    tcp_shape: tuple[int, int, int, int]
    chunks: int = 1
    resume: bool = False

    @property
    def request_bytes(self) -> int:
        return self.layout.block_bytes() * self.chunks


_SMOL = BlockLayout("float16", 30, 3, 64, CHUNK_TOKENS)  # SmolLM2-135M: 30 layers, 3 KV heads of 64
_BIG = BlockLayout("float16", 2, 8, 128, CHUNK_TOKENS)  # 2 MiB in large pieces
WORKLOADS: list[Workload] = [
    Workload("chunk-5.9MB", _SMOL, "(2,512,16,3,64):float16:30", (2, 30, 256, 192)),
    Workload("chunk-2MiB", _BIG, "(2,512,16,8,128):float16:2", (2, 2, 256, 1024)),
    Workload("8x2MiB", _BIG, "(2,512,16,8,128):float16:2", (2, 2, 256, 1024), chunks=8),
    Workload("resume-2048", _SMOL, "(2,512,16,3,64):float16:30", (2, 30, 256, 192), chunks=8, resume=True),
]


def lmcache_venv() -> Path | None:
    """The LMCache virtualenv, or ``None`` if none has a python: ``$KVTIER_LMCACHE_VENV`` when set, else
    ``.lmcache-venv`` in the current directory, else in the checkout kvtier runs from (``make lmcache-venv``)."""
    if os.environ.get(VENV_ENV):
        places = [Path(os.environ[VENV_ENV])]
    else:
        places = [Path.cwd() / ".lmcache-venv", _REPO / ".lmcache-venv"]
    return next((v for v in places if (v / "bin" / "python").is_file()), None)


def reps(ctx: BenchContext, wl: Workload) -> int:
    """Requests to time for ``wl``: the run's byte budget, at least 3 (tiny) or 8, at most 40."""
    return ctx.iterations(wl.request_bytes, lo=8, hi=40)


# --------------------------------------------------------------------------- rows and ratios

def make_rows(system: str, path: str, wl: Workload, raw: dict) -> list[dict]:
    """Store and retrieve rows of one workload from raw samples ``{store_ms, retrieve_ms, verified,
    mismatched, failed, error}`` (the driver's output shape; kvtier's samples use it too).

    A workload with no samples gives no rows; its error (if any) is the caller's note.
    """
    rows = []
    for op in ("store", "retrieve"):
        ms = raw.get(f"{op}_ms") or []
        if not ms:
            continue
        rows.append({"system": system, "path": path, "workload": wl.name, "op": op,
                     "block_bytes": raw.get("bytes_per_request") or wl.request_bytes, "chunks": wl.chunks,
                     **summarize([m / 1e3 for m in ms], raw.get("bytes_per_request") or wl.request_bytes),
                     "verified": int(raw.get("verified", 0)), "mismatched": int(raw.get("mismatched", 0)),
                     "failed": int(raw.get("failed", 0))})
    return rows


def parse_driver_output(text: str, workloads: list[Workload]) -> dict[str, dict]:
    """The driver's stdout -> ``{workload name: raw samples}``.

    :raises ValueError: if it is not the driver's JSON or names a workload that was not asked for.
    """
    doc = json.loads(text)
    if not isinstance(doc, dict) or not isinstance(doc.get("workloads"), list):
        raise ValueError("driver output has no 'workloads' list")
    names = {w.name for w in workloads}
    out = {}
    for raw in doc["workloads"]:
        if raw.get("name") not in names:
            raise ValueError(f"driver answered for unknown workload {raw.get('name')!r}")
        out[raw["name"]] = raw
    return out


def compare(rows: list[dict]) -> tuple[list[dict], dict]:
    """Per workload and op: p50 ratios of kvtier against LMCache, and the worst of each target.

    ``grpc_speedup`` = LMCache-over-gRPC p50 / kvtier-gRPC p50 (goal >= 1, store and retrieve);
    ``same_host_ratio`` = kvtier-shm p50 / LMCache's best transport's p50 (zmq, gRPC or TCP server; goal
    <= 0.5 for retrieve, reported as ``same_host_ratio``, and <= 1.0 for store, ``same_host_store_ratio``).
    A pair with a side that was not measured, or that mismatched a payload, gives ``None``.

    :returns: ``(comparison rows, {"grpc_speedup": (worst, where), "same_host_ratio": (worst, where),
        "same_host_store_ratio": (worst, where)})``.
    """
    def p50(system: str, path: str, wl: str, op: str) -> float | None:
        r = next((r for r in rows if (r["system"], r["path"], r["workload"], r["op"]) == (system, path, wl, op)), None)
        return None if r is None or r["mismatched"] or not r["verified"] else r["p50_ms"]

    out, worst = [], {"grpc_speedup": (None, ""), "same_host_ratio": (None, ""), "same_host_store_ratio": (None, "")}
    for wl in dict.fromkeys(r["workload"] for r in rows):
        for op in ("store", "retrieve"):
            lmc = [v for v in (p50("lmcache", t, wl, op) for t in ("zmq", "grpc", "tcp")) if v is not None]
            row = {"workload": wl, "op": op, "kvtier_grpc_ms": p50("kvtier", "grpc", wl, op),
                   "kvtier_shm_ms": p50("kvtier", "shm", wl, op), "lmcache_zmq_ms": p50("lmcache", "zmq", wl, op),
                   "lmcache_grpc_ms": p50("lmcache", "grpc", wl, op), "lmcache_tcp_ms": p50("lmcache", "tcp", wl, op)}
            row["grpc_speedup"] = ratio(row["lmcache_grpc_ms"], row["kvtier_grpc_ms"])
            row["same_host_ratio"] = ratio(row["kvtier_shm_ms"], min(lmc)) if lmc else None
            out.append(row)
            where = f"{wl} {op}"
            v = row["grpc_speedup"]
            if v is not None and (worst["grpc_speedup"][0] is None or v < worst["grpc_speedup"][0]):
                worst["grpc_speedup"] = (v, where)
            v, field = row["same_host_ratio"], "same_host_ratio" if op == "retrieve" else "same_host_store_ratio"
            if v is not None and (worst[field][0] is None or v > worst[field][0]):
                worst[field] = (v, where)
    return out, worst


# --------------------------------------------------------------------------- kvtier

def _namespace(wl: Workload) -> Namespace:
    return Namespace(DEFAULT_TENANT, f"kvtier-bench/lmcache/{wl.name}", "r1", wl.layout)


def same_bytes(got: list[torch.Tensor], want: list[np.ndarray]) -> bool:
    """Whether the blocks a Get returned hold exactly the stored payloads, in order."""
    return len(got) == len(want) and all(
        np.array_equal(g.reshape(-1).view(torch.uint8).numpy(), w.reshape(-1)) for g, w in zip(got, want))


def kvtier_samples(client: KVTierClient, wl: Workload, n: int, index: int, produce: bool = False) -> dict:
    """Store then get ``n`` (+1 warm-up) fresh requests of ``wl``; raw samples as the driver gives them.

    :param produce: store as a caller producing its blocks into the client's leased buffers
        (:func:`~service.apps.bench.transport.put_via_buffers`; the fill is timed as part of the store)."""
    ns = _namespace(wl)
    tokens_per = wl.chunks * CHUNK_TOKENS
    raw = {"bytes_per_request": wl.request_bytes, "store_ms": [], "retrieve_ms": [], "verified": 0,
           "mismatched": 0, "failed": 0}
    for rep in range(n + 1):
        base = (index * 1000 + rep) * tokens_per
        tokens = np.arange(base, base + tokens_per, dtype=np.uint32)
        payloads = [tiers.payload(wl.layout, seed=base + c) for c in range(wl.chunks)]
        sid = f"lmcache-bench-{index}-{rep}" if wl.resume else None
        t0 = time.perf_counter()
        if produce:
            put_via_buffers(client, ns, tokens, payloads, session_id=sid)
        else:
            client.put(ns, tokens, payloads, session_id=sid)
        t1 = time.perf_counter()
        got = client.get(session_id=sid) if wl.resume else client.get(chain_keys(ns, tokens))
        t2 = time.perf_counter()
        if rep == 0:
            continue
        if len(got.blocks) != wl.chunks:
            raw["failed"] += 1
            continue
        raw["verified" if same_bytes(got.blocks, payloads) else "mismatched"] += 1
        raw["store_ms"].append((t1 - t0) * 1e3)
        raw["retrieve_ms"].append((t2 - t1) * 1e3)
    return raw


def kvtier_rows(ctx: BenchContext, path: str, client_kwargs: dict) -> list[dict]:
    """Every workload through a fresh warm kvtier server and one client on data path ``path``."""
    rows = []
    with kvtier_server(ctx.workdir, f"lmcache-kvtier-{path}", ctx.workdir / f"lmcache-kvtier-{path}",
                       store=KVTIER_SETTINGS) as address, \
            KVTierClient(address, timeout=120, **client_kwargs) as client:
        client.wait_ready(30)
        if not ctx.tiny:  # toy sizes: recycling does not matter
            ctx.step(f"kvtier/{path}: filling the warm tier ({KVTIER_WARM_BYTES >> 20} MiB)")
            fill_warm(client, KVTIER_WARM_BYTES + (64 << 20))
        for i, wl in enumerate(WORKLOADS):
            ctx.step(f"kvtier/{path} {wl.name}")
            rows += make_rows("kvtier", path, wl, kvtier_samples(client, wl, reps(ctx, wl), i + 1,
                                                                 produce=path == "shm"))
    return rows


# --------------------------------------------------------------------------- LMCache

def _lmcache_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({"LMCACHE_TRACK_USAGE": "false", "DO_NOT_TRACK": "1", "LMCACHE_DISABLE_BANNER": "1"})
    return env


def _wait_ports(proc: subprocess.Popen, ports: list[int], log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for port in ports:
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"LMCache server exited with code {proc.returncode}:\n{tail}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"LMCache server not listening on {port} after {timeout_s:.0f} s") from None
                time.sleep(0.2)


def _stop_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the server's own process group (it was started in a new session), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
    with contextlib.suppress(ProcessLookupError):  # children left behind by a server that already exited
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def lmcache_server(workdir: Path, venv: Path, path: str, timeout_s: float = 180.0) -> Iterator[dict]:
    """Run the LMCache server of ``path`` (:data:`LMCACHE_PATHS`) on 127.0.0.1; yields the driver's spec
    fields that reach it (``rpc_url``, or ``host`` and ``port``)."""
    kind, transport = LMCACHE_PATHS[path]
    port = free_port()
    if kind == "mp":
        http_port = free_port()
        cmd = [str(venv / "bin" / "lmcache"), "server", "--transport", transport, "--host", "127.0.0.1",
               "--port", str(port), "--http-host", "127.0.0.1", "--http-port", str(http_port),
               "--l1-size-gb", str(L1_GB), "--eviction-policy", "LRU", "--chunk-size", str(CHUNK_TOKENS)]
        ports = [port, http_port]  # HTTP comes up last
        fields = {"server": "mp", "rpc_url": f"{'tcp' if transport == 'zmq' else 'grpc'}://127.0.0.1:{port}"}
    else:
        cmd = [str(venv / "bin" / "lmcache_server"), "127.0.0.1", str(port), "cpu"]
        ports, fields = [port], {"server": "tcp", "host": "127.0.0.1", "port": port}
    log_path = workdir / f"lmcache-{path}.log"
    with open(log_path, "ab") as log_fh:
        proc = subprocess.Popen(cmd, env=_lmcache_env(), cwd=str(workdir), stdout=log_fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_ports(proc, ports, log_path, timeout_s)
        yield fields
    finally:
        _stop_group(proc)


def driver_spec(fields: dict, workloads: list[Workload], n: dict[str, int], interval_s: float = 0.02) -> dict:
    """The driver's JSON spec for ``workloads`` against the server described by ``fields``."""
    return {**fields, "interval_s": interval_s, "workloads": [
        {"name": w.name, "shape_spec": w.lmcache_spec, "chunk_shape": list(w.tcp_shape), "chunks": w.chunks,
         "reps": n[w.name], "resume": w.resume} for w in workloads]}


def lmcache_rows(ctx: BenchContext, venv: Path, path: str, notes: list[str]) -> list[dict]:
    """Every workload against a fresh LMCache server of ``path``, through the driver in LMCache's venv."""
    rows = []
    n = {w.name: reps(ctx, w) for w in WORKLOADS}
    ctx.step(f"lmcache/{path}: starting the server")
    with lmcache_server(ctx.workdir, venv, path) as fields:
        spec_path = ctx.workdir / f"lmcache-{path}.json"
        spec_path.write_text(json.dumps(driver_spec(fields, WORKLOADS, n)))
        ctx.step(f"lmcache/{path}: {len(WORKLOADS)} workloads")
        with open(ctx.workdir / f"lmcache-{path}-driver.log", "ab") as err:
            done = subprocess.run([str(venv / "bin" / "python"), str(DRIVER), str(spec_path)], env=_lmcache_env(),
                                  cwd=str(ctx.workdir), stdout=subprocess.PIPE, stderr=err, timeout=900, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"lmcache driver exited with {done.returncode}; see logs/lmcache-{path}-driver.log")
    for wl in WORKLOADS:
        raw = parse_driver_output(done.stdout.decode(), WORKLOADS).get(wl.name, {})
        if raw.get("error") or raw.get("failed") or raw.get("mismatched"):
            notes.append(f"lmcache/{path} {wl.name}: {raw.get('error') or ''} failed {raw.get('failed', 0)}, "
                         f"mismatched {raw.get('mismatched', 0)}")
        rows += make_rows("lmcache", path, wl, raw)
    return rows


# --------------------------------------------------------------------------- scenario

def plot(rows: list[dict], path: Path) -> None:
    """p50 latency per workload, one bar per system/path/op (log scale)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wls = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(wls), figsize=(5 * len(wls), 5), squeeze=False)
    try:
        for ax, wl in zip(axes[0], wls):
            sel = [r for r in rows if r["workload"] == wl]
            ax.barh([f"{r['system']}/{r['path']}/{r['op']}" for r in sel], [r["p50_ms"] for r in sel],
                    color=["C0" if r["system"] == "kvtier" else "C1" for r in sel])
            ax.set_title(wl)
            ax.set_xlabel("p50 ms (lower is better)")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap
        fig.tight_layout()
        fig.savefig(path, dpi=90)
    finally:
        plt.close(fig)


def run(ctx: BenchContext) -> dict:
    """Rows ``{system, path, workload, op, block_bytes, chunks, n, gbps, p50_ms, p99_ms, mean_ms, verified,
    mismatched, failed}``, plus ``comparison`` (ratios per workload and op) and the targets' worst values."""
    venv = lmcache_venv()
    if venv is None:
        return {"status": "not measured", "rows": [],
                "notes": [f"LMCache not installed: run `make lmcache-venv` (or set ${VENV_ENV})"]}
    notes: list[str] = []
    rows: list[dict] = []
    for path, kwargs in KVTIER_PATHS.items():
        try:
            rows += kvtier_rows(ctx, path, kwargs)
        except Exception as exc:  # e.g. a server without the shared-memory path: the other rows still count
            notes.append(f"kvtier/{path} not measured: {type(exc).__name__}: {exc}")
    for path in LMCACHE_PATHS:
        try:
            rows += lmcache_rows(ctx, venv, path, notes)
        except Exception as exc:  # one LMCache server that will not run must not cost the others
            notes.append(f"lmcache/{path} not measured: {type(exc).__name__}: {exc}")
    bad = [f"{r['system']}/{r['path']} {r['workload']}" for r in rows if r["mismatched"]]
    if bad:
        notes.append("PAYLOAD MISMATCH (excluded from ratios): " + ", ".join(sorted(set(bad))))
    comparison, worst = compare(rows)
    for c in comparison:
        speedup = "-" if c["grpc_speedup"] is None else f"{c['grpc_speedup']:.2f}"
        same_host = "" if c["same_host_ratio"] is None else f", kvtier-shm/LMCache p50 = {c['same_host_ratio']:.2f}"
        notes.append(f"{c['workload']} {c['op']}: LMCache-gRPC/kvtier-gRPC p50 = {speedup}{same_host}")
    notes.append("LMCache mp server: lmcache_driven over POSIX SHM, L1 in host RAM; tcp server: bytes on the socket, "
                 f"a store timed to the EXIST answer behind it; kvtier: a {KVTIER_WARM_BYTES >> 20} MiB warm tier, "
                 "full before the timed requests (stores reuse evicted memory, as LMCache's first-touched L1 does); "
                 "kvtier/shm store: the caller produces its blocks into leased arena buffers (block_buffers), the "
                 "fill (one copy of the payload) timed as part of the store; p50/p99 over "
                 f"{', '.join(f'{w.name} x{reps(ctx, w)}' for w in WORKLOADS)}; every payload compared byte for byte")
    try:
        if rows:
            plot(rows, ctx.out / "lmcache.png")
    except Exception as exc:  # a plot is a convenience: report it, keep the rows
        notes.append(f"plot lmcache: {type(exc).__name__}: {exc}")
    return {"rows": rows, "notes": notes, "comparison": comparison,
            **{k: v for field, (worst_v, at) in worst.items() for k, v in ((field, worst_v), (f"{field}_at", at))}}

