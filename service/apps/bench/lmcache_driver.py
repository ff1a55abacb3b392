"""LMCache's side of ``kvtier bench --peers lmcache``: run by the LMCache virtualenv's python, never imported.

It drives a running LMCache server with LMCache's own client code and prints one JSON document of raw
timings on stdout (``service/apps/bench/lmcache_peer.py`` starts the servers, runs this script and turns
the timings into rows). It imports only the standard library, torch and lmcache, because it runs in
``.lmcache-venv`` where kvtier is not installed.

Two servers, two clients:

* ``mp``: the multiprocess server (``lmcache server``, zmq or gRPC transport) through
  ``ServerBenchClient``, the client of ``lmcache bench server``, in ``lmcache_driven`` CPU mode: the
  client's paged KV cache is POSIX shared memory mapped by the server, the transport carries only
  control messages, and the server copies pages into (store) or out of (retrieve) its L1 itself.
  ``lmcache bench server`` cannot check payloads in this mode (its ``zero_destination`` is a no-op
  and its checksums hash the same shared pages before and after), so this script fills each
  request's pages with fresh random bytes, keeps a copy, zeroes the pages, retrieves and compares.
* ``tcp``: the older plain-TCP server (``lmcache_server HOST PORT cpu``) through the wire messages of
  ``lmcache.v1.protocol`` the way ``LMCServerConnector`` (the ``lm://`` remote backend) uses them:
  one PUT or GET per 256-token chunk, the bytes themselves on the socket. PUT has no answer, so a
  store is timed up to the answer of an EXIST sent after it on the same connection (the server
  handles one connection's commands in order), which is when the store is known to have landed.

Spec (``argv[1]``, a JSON file): ``{"server": "mp"|"tcp", "rpc_url", "host", "port", "interval_s",
"workloads": [{"name", "shape_spec" (mp) | "chunk_shape" (tcp), "chunks", "reps", "resume"}]}``.
``resume``: the timed retrieve includes the lookup an engine does first (mp: LOOKUP until its
prefetch is done; tcp: one EXIST per chunk). Output: ``{"workloads": [{"name", "bytes_per_request",
"store_ms", "retrieve_ms", "lookup_ms", "verified", "mismatched", "failed", "error"}]}``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback

CHUNK_TOKENS = 256
_HELLO = 9906  # the filler token of lmcache bench server (any token works: the first one differs per request)


#: Differs per run: LMCache keys a chunk by model name and token prefix only, so a server that already
#: holds a prefix from an earlier run (or another shape) skips the store and fails the retrieve.
_RUN = int.from_bytes(os.urandom(3), "little")


def _tokens(seq: int, n: int) -> tuple[int, ...]:
    """``n + 1`` token ids (like ``lmcache bench server``), unique to this run and ``seq``."""
    return (_RUN, seq) + (_HELLO,) * (n - 1)


def _result(name: str) -> dict:
    return {"name": name, "bytes_per_request": 0, "store_ms": [], "retrieve_ms": [], "lookup_ms": [],
            "verified": 0, "mismatched": 0, "failed": 0, "error": None}


# --------------------------------------------------------------------------- multiprocess server

def _mp_client(rpc_url: str, shape_spec: str, log):
    from lmcache.cli.commands.bench.server_bench.client import ServerBenchClient
    from lmcache.cli.commands.bench.server_bench.config import BenchConfig

    config = BenchConfig(rpc_url=rpc_url, http_url="", mode="cpu", transfer_mode="lmcache_driven", tp_size=1,
                         use_mla=False, num_tokens=CHUNK_TOKENS, kvcache_shape_spec=shape_spec, num_blocks=512,
                         block_size=16)
    client = ServerBenchClient(config, log)
    client.start()
    return client


def _wait_lookup(client, request, deadline_s: float = 10.0) -> int:
    """LOOKUP, then poll its prefetch status every 0.5 ms (bench server's helper sleeps 50 ms)."""
    from lmcache.cli.commands.bench.server_bench.helpers import _TIMEOUT, _make_key, _wait_for_result

    key = _make_key(request.token_ids, request.request_id, start=0, end=request.num_full_tokens,
                    world_size=client._kv_world_size)
    req_client = client._require_started()
    if _wait_for_result(req_client.lookup(key, 1)) is _TIMEOUT:
        return -1
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        hit = _wait_for_result(req_client.query_prefetch_status(request.request_id))
        if hit is _TIMEOUT:
            return -1
        if hit is not None:
            return hit
        time.sleep(0.0005)
    return -1


def _mp_workload(client, wl: dict, index: int, interval_s: float) -> dict:
    import torch
    from lmcache.cli.commands.bench.server_bench.client import RequestContext

    res = _result(wl["name"])
    tensors = list(client._workers[0].kv_caches.values())
    block_size, n_blocks_total = client._block_size, client._num_blocks
    tokens = wl["chunks"] * CHUNK_TOKENS
    blocks = tokens // block_size
    slots = max(n_blocks_total // blocks, 1)
    res["bytes_per_request"] = sum(t.narrow(1, 0, blocks).numel() * t.element_size() for t in tensors)
    gen = torch.Generator().manual_seed(index)
    for rep in range(wl["reps"] + 1):  # rep 0 is a warm-up, not recorded
        seq = index * 100_000 + rep
        off = (rep % slots) * blocks

        def request(kind: str) -> RequestContext:
            return RequestContext(sequence_id=seq, request_id=f"kvtier-{seq}-{kind}", request_kind=kind,
                                  token_ids=_tokens(seq, tokens), num_full_tokens=tokens,
                                  total_chunks=wl["chunks"], chunk_size=CHUNK_TOKENS, block_offset=off,
                                  num_blocks=blocks)

        pages = [t.narrow(1, off, blocks) for t in tensors]
        for p in pages:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))
        expected = [p.clone() for p in pages]
        put = request("store")
        t0 = time.perf_counter()
        stored = client.store(put, 0, tokens)
        t_store = time.perf_counter() - t0
        client.end_session(put)
        time.sleep(interval_s)  # an acknowledged store is visible to LOOKUP only a moment later
        for p in pages:
            p.zero_()
        get = request("retrieve")
        t0 = time.perf_counter()
        hit = _wait_lookup(client, get)
        t_lookup = time.perf_counter() - t0
        if hit != wl["chunks"]:
            res["failed"] += 1
            client.end_session(get)
            continue
        t1 = time.perf_counter()
        got = client.retrieve(get, 0, tokens)
        t_retrieve = time.perf_counter() - t1
        client.end_session(get)
        ok = stored is not None and stored.succeeded and got is not None and got.succeeded
        if not ok:
            res["failed"] += 1
            continue
        same = all(torch.equal(p.view(torch.uint8), e.view(torch.uint8)) for p, e in zip(pages, expected))
        if rep == 0:
            continue
        res["verified" if same else "mismatched"] += 1
        res["store_ms"].append(t_store * 1e3)
        res["lookup_ms"].append(t_lookup * 1e3)
        res["retrieve_ms"].append((t_lookup + t_retrieve if wl.get("resume") else t_retrieve) * 1e3)
    return res


def run_mp(spec: dict, log) -> list[dict]:
    # One registered client at a time: every ServerBenchClient registers as instance 1000, and a second
    # live registration makes the server move the pages of the first one (seen here as mismatches).
    out, client, shape = [], None, None
    try:
        for i, wl in enumerate(spec["workloads"]):
            try:
                if wl["shape_spec"] != shape:
                    if client is not None:
                        client.close()
                        client = None
                    client, shape = _mp_client(spec["rpc_url"], wl["shape_spec"], log), wl["shape_spec"]
                out.append(_mp_workload(client, wl, i + 1, spec.get("interval_s", 0.02)))
            except Exception as exc:  # one failed workload must not cost the others their rows
                r = _result(wl["name"])
                r["error"] = f"{type(exc).__name__}: {exc}"
                log(traceback.format_exc())
                out.append(r)
    finally:
        if client is not None:
            client.close()
    return out


# --------------------------------------------------------------------------- plain-TCP server

def _recv_into(sock: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], len(view) - got)
        if n == 0:
            return False
        got += n
    return True


def run_tcp(spec: dict, log) -> list[dict]:
    import torch
    from lmcache.utils import CacheEngineKey
    from lmcache.v1.memory_management import MemoryFormat
    from lmcache.v1.protocol import ClientCommand, ClientMetaMessage, ServerMetaMessage, ServerReturnCode

    sock = socket.create_connection((spec["host"], spec["port"]), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    meta_len = ServerMetaMessage.packlength()
    meta_buf = bytearray(meta_len)

    def call(cmd, key, length=0, fmt=MemoryFormat(1), dtype=torch.float16, shape=torch.Size([0, 0, 0, 0]), body=None):
        sock.sendall(ClientMetaMessage(cmd, key, length, fmt, dtype, shape).serialize())
        if body is not None:
            sock.sendall(body)
            return None
        if not _recv_into(sock, memoryview(meta_buf)):
            raise ConnectionError("server closed the connection")
        return ServerMetaMessage.deserialize(bytes(meta_buf))

    out = []
    try:
        for i, wl in enumerate(spec["workloads"]):
            res = _result(wl["name"])
            shape = torch.Size(wl["chunk_shape"])
            gen = torch.Generator().manual_seed(i + 1)
            chunk_bytes = shape.numel() * 2
            res["bytes_per_request"] = chunk_bytes * wl["chunks"]
            recv = [bytearray(chunk_bytes) for _ in range(wl["chunks"])]  # LMCServerConnector recv_into's
            try:
                for rep in range(wl["reps"] + 1):
                    seq = (i + 1) * 100_000 + rep
                    keys = [CacheEngineKey("kvtier-bench", 1, 0, (_RUN << 32) + seq * 64 + c, torch.float16)
                            for c in range(wl["chunks"])]
                    data = [torch.randn(shape, generator=gen).to(torch.float16).view(torch.uint8).numpy().tobytes()
                            for _ in keys]
                    t0 = time.perf_counter()
                    for k, d in zip(keys, data):
                        call(ClientCommand.PUT, k, len(d), MemoryFormat.KV_2LTD, torch.float16, shape, body=d)
                    acked = call(ClientCommand.EXIST, keys[-1]).code == ServerReturnCode.SUCCESS
                    t_store = time.perf_counter() - t0
                    time.sleep(spec.get("interval_s", 0.02))
                    t0 = time.perf_counter()
                    if wl.get("resume"):
                        acked &= all(call(ClientCommand.EXIST, k).code == ServerReturnCode.SUCCESS for k in keys)
                    t_lookup = time.perf_counter() - t0
                    ok = acked
                    for k, buf in zip(keys, recv):
                        meta = call(ClientCommand.GET, k)
                        ok &= meta.code == ServerReturnCode.SUCCESS and meta.length == chunk_bytes
                        if meta.code == ServerReturnCode.SUCCESS and not _recv_into(sock, memoryview(buf)[:meta.length]):
                            raise ConnectionError("server closed the connection mid-GET")
                    t_retrieve = time.perf_counter() - t0
                    if rep == 0:
                        continue
                    if not ok:
                        res["failed"] += 1
                        continue
                    res["verified" if all(b == d for b, d in zip(recv, data)) else "mismatched"] += 1
                    res["store_ms"].append(t_store * 1e3)
                    res["lookup_ms"].append(t_lookup * 1e3)
                    res["retrieve_ms"].append(t_retrieve * 1e3)
            except Exception as exc:
                res["error"] = f"{type(exc).__name__}: {exc}"
                log(traceback.format_exc())
            out.append(res)
    finally:
        sock.close()
    return out


def main(argv: list[str]) -> int:
    with open(argv[1]) as fh:
        spec = json.load(fh)

    def log(text: str) -> None:
        if os.environ.get("KVTIER_LMCACHE_DRIVER_VERBOSE"):
            sys.stderr.write(text + "\n")

    workloads = run_mp(spec, log) if spec["server"] == "mp" else run_tcp(spec, log)
    json.dump({"workloads": workloads}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
