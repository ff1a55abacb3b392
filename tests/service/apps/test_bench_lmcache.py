"""``kvtier bench --peers lmcache`` (``service/apps/bench/lmcache_peer.py`` and ``lmcache_driver.py``).

The harness's own logic (driver output parsing, row building, byte verification, ratios, the spec it
hands the driver, the CLI flag) is checked without LMCache. The end-to-end tests start real LMCache
servers and run only where ``.lmcache-venv`` exists (``make lmcache-venv``); timings are never asserted.
"""

from __future__ import annotations

import json
import socket
import subprocess

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kvtier.service.apps.bench import lmcache_driver as driver
from kvtier.service.apps.bench import lmcache_peer as peer
from kvtier.service.apps.bench.context import BenchContext
from kvtier.service.apps.bench.runner import parse_peers
from kvtier.service.apps.cli import app

WL = {w.name: w for w in peer.WORKLOADS}


def _raw(name: str, store=(2.0, 4.0), retrieve=(1.0, 3.0), **kw) -> dict:
    return {"name": name, "bytes_per_request": WL[name].request_bytes, "store_ms": list(store),
            "retrieve_ms": list(retrieve), "lookup_ms": [], "verified": len(store), "mismatched": 0, "failed": 0,
            "error": None, **kw}


# --------------------------------------------------------------------------- without LMCache

def test_workloads_move_the_same_bytes_on_every_system():
    for wl in peer.WORKLOADS:
        spec_layers = int(wl.lmcache_spec.rsplit(":", 1)[1])
        nb_bs_nh_hs = [int(x) for x in wl.lmcache_spec.split(")")[0].strip("(").split(",")[2:]]
        lmcache_chunk = 2 * spec_layers * peer.CHUNK_TOKENS * nb_bs_nh_hs[1] * nb_bs_nh_hs[2] * 2
        assert wl.layout.block_bytes() == lmcache_chunk == int(np.prod(wl.tcp_shape)) * 2, wl.name
    assert WL["chunk-5.9MB"].request_bytes == 5_898_240
    assert WL["chunk-2MiB"].request_bytes == 2 << 20
    assert WL["resume-2048"].chunks * peer.CHUNK_TOKENS == 2048 and WL["resume-2048"].resume


def test_parse_driver_output_keys_by_workload_and_rejects_strangers():
    text = json.dumps({"workloads": [_raw("chunk-2MiB")]})
    assert set(peer.parse_driver_output(text, peer.WORKLOADS)) == {"chunk-2MiB"}
    with pytest.raises(ValueError, match="unknown workload"):
        peer.parse_driver_output(json.dumps({"workloads": [{"name": "nope"}]}), peer.WORKLOADS)
    with pytest.raises(ValueError, match="workloads"):
        peer.parse_driver_output(json.dumps({"rows": []}), peer.WORKLOADS)
    with pytest.raises(ValueError):
        peer.parse_driver_output("LMCache banner, not JSON", peer.WORKLOADS)


def test_make_rows_summarizes_store_and_retrieve():
    rows = peer.make_rows("lmcache", "zmq", WL["chunk-2MiB"], _raw("chunk-2MiB"))
    assert [r["op"] for r in rows] == ["store", "retrieve"]
    store = rows[0]
    assert store["p50_ms"] == pytest.approx(3.0) and store["n"] == 2 and store["verified"] == 2
    assert store["gbps"] == pytest.approx(2 * (2 << 20) / 0.006 / 1e9)
    assert peer.make_rows("lmcache", "zmq", WL["chunk-2MiB"], {"error": "boom"}) == []


def test_same_bytes_catches_any_flipped_byte_and_a_short_answer():
    want = [np.arange(64, dtype=np.uint8), np.arange(64, 128, dtype=np.uint8)]
    got = [torch.from_numpy(w.copy()).view(torch.float16) for w in want]
    assert peer.same_bytes(got, want)
    got[1].view(torch.uint8)[7] ^= 1
    assert not peer.same_bytes(got, want)
    assert not peer.same_bytes(got[:1], want)


def test_compare_takes_worst_row_and_skips_unverified_sides():
    rows = []
    for name, kv_grpc, lmc_grpc, kv_shm, lmc_zmq in (("chunk-2MiB", 2.0, 4.0, 0.5, 3.0),
                                                     ("8x2MiB", 10.0, 8.0, 1.0, 12.0)):
        wl = WL[name]
        rows += peer.make_rows("kvtier", "grpc", wl, _raw(name, store=(kv_grpc,), retrieve=(kv_grpc,)))
        rows += peer.make_rows("kvtier", "shm", wl, _raw(name, store=(kv_shm,), retrieve=(kv_shm,)))
        rows += peer.make_rows("lmcache", "grpc", wl, _raw(name, store=(lmc_grpc,), retrieve=(lmc_grpc,)))
        rows += peer.make_rows("lmcache", "zmq", wl, _raw(name, store=(lmc_zmq,), retrieve=(lmc_zmq,)))
    comparison, worst = peer.compare(rows)
    assert worst["grpc_speedup"] == (pytest.approx(0.8), "8x2MiB store")
    # same host: 0.5 / min(3, 4) and 1 / min(12, 8): the faster LMCache transport is the reference
    assert worst["same_host_ratio"] == (pytest.approx(0.5 / 3), "chunk-2MiB retrieve")
    assert worst["same_host_store_ratio"] == (pytest.approx(0.5 / 3), "chunk-2MiB store")
    assert len(comparison) == 4
    # LMCache's plain TCP server counts among its transports: when it is the fastest, it is the reference
    rows += peer.make_rows("lmcache", "tcp", WL["8x2MiB"], _raw("8x2MiB", store=(0.5,), retrieve=(4.0,)))
    worst = peer.compare(rows)[1]
    assert worst["same_host_store_ratio"] == (pytest.approx(1.0 / 0.5), "8x2MiB store")
    assert worst["same_host_ratio"] == (pytest.approx(1.0 / 4.0), "8x2MiB retrieve")

    for r in rows:  # a mismatched payload never counts as a measurement
        if r["system"] == "lmcache" and r["path"] == "grpc" and r["workload"] == "8x2MiB":
            r["mismatched"] = 1
    assert peer.compare(rows)[1]["grpc_speedup"] == (pytest.approx(2.0), "chunk-2MiB store")


def test_driver_spec_carries_every_workload():
    n = {w.name: 3 for w in peer.WORKLOADS}
    spec = peer.driver_spec({"server": "mp", "rpc_url": "tcp://127.0.0.1:1"}, peer.WORKLOADS, n)
    assert spec["server"] == "mp" and spec["rpc_url"].startswith("tcp://127.0.0.1:")
    assert [w["name"] for w in spec["workloads"]] == list(WL)
    assert all(w["reps"] == 3 for w in spec["workloads"])
    assert [w["resume"] for w in spec["workloads"]] == [False, False, False, True]
    json.dumps(spec)


def test_driver_tokens_are_unique_per_request_and_recv_into_reads_everything():
    assert driver._tokens(1, 256) != driver._tokens(2, 256)
    assert len(driver._tokens(1, 256)) == 257  # lmcache bench server's shape: n + 1 tokens
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"x" * 100_000)
        buf = bytearray(100_000)
        assert driver._recv_into(b, memoryview(buf)) and buf == b"x" * 100_000
        a.close()
        assert not driver._recv_into(b, memoryview(bytearray(1)))


def test_peers_flag_parses_and_rejects_unknown(tmp_path):
    assert parse_peers(None) == [] and parse_peers("lmcache") == ["lmcache"]
    result = CliRunner().invoke(app, ["bench", "--peers", "redis2", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown peer" in result.output


def test_without_the_venv_the_peer_is_not_measured(tmp_path, monkeypatch):
    monkeypatch.setenv(peer.VENV_ENV, str(tmp_path / "no-venv"))
    res = peer.run(BenchContext(out=tmp_path, workdir=tmp_path, quick=True, tiny=True))
    assert res["status"] == "not measured" and "make lmcache-venv" in res["notes"][0]


def test_the_venv_is_found_in_the_current_directory_then_the_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv(peer.VENV_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    here = tmp_path / ".lmcache-venv"
    (here / "bin").mkdir(parents=True)
    (here / "bin" / "python").write_text("")
    assert peer.lmcache_venv() == here
    (here / "bin" / "python").unlink()
    checkout = peer._REPO / ".lmcache-venv"
    assert (peer._REPO / "setup.py").is_file(), "the checkout is the repository root"
    assert peer.lmcache_venv() == (checkout if (checkout / "bin" / "python").is_file() else None)


# --------------------------------------------------------------------------- with LMCache

needs_lmcache = pytest.mark.skipif(peer.lmcache_venv() is None, reason="no .lmcache-venv (make lmcache-venv)")


@needs_lmcache
@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", ["zmq", "tcp"])
def test_driver_verifies_every_payload_against_a_real_server(tmp_path, path):
    venv = peer.lmcache_venv()
    wls = [WL["chunk-2MiB"], WL["8x2MiB"]]
    with peer.lmcache_server(tmp_path, venv, path) as fields:
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps(peer.driver_spec(fields, wls, {w.name: 2 for w in wls})))
        done = subprocess.run([str(venv / "bin" / "python"), str(peer.DRIVER), str(spec)], capture_output=True,
                              timeout=240, check=True)
    raw = peer.parse_driver_output(done.stdout.decode(), wls)
    for w in wls:
        assert raw[w.name]["error"] is None, raw[w.name]
        assert (raw[w.name]["verified"], raw[w.name]["mismatched"], raw[w.name]["failed"]) == (2, 0, 0)
        assert len(raw[w.name]["retrieve_ms"]) == 2
