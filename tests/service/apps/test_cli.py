"""The ``kvtier`` CLI against a running server: ``stats`` and read-only ``inspect`` of a held data dir."""

from __future__ import annotations

import json
import subprocess
import sys

from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from tests.fixtures.server import ROOT
from tests.fixtures.wire import namespace, put_stream, random_blocks, stub, tokens


def _kvtier(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_stats_and_inspect_while_serving(shared_server):
    ns = namespace(model="cli/model")
    channel, kv = stub(shared_server.target)
    with channel:
        kv.Put(put_stream(pb.PutHeader(namespace=ns, token_ids=tokens(48), block_count=3, session_id="cli",
                                       durable=True), random_blocks(ns, 48)), timeout=30)
    done = _kvtier("stats", "--target", shared_server.target)
    assert done.returncode == 0, done.stderr
    assert "warm" in done.stdout and "compression ratio" in done.stdout
    done = _kvtier("inspect", str(shared_server.data_dir), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["blocks"] >= 3 and summary["sessions"] >= 1 and summary["compression_ratio"] > 0
    mine = [n for n in summary["namespaces"] if n["model"] == "cli/model"]
    assert mine == [{"tenant": "default", "model": "cli/model", "revision": "r1", "layout": "float16:4x2x64/16",
                     "blocks": 3, "sessions": 1}]
    assert "blocks" in _kvtier("inspect", str(shared_server.data_dir)).stdout


def test_cli_errors():
    assert _kvtier("stats", "--target", "127.0.0.1:1", "--timeout", "1").returncode == 1
    assert _kvtier("inspect", "/nonexistent/dir").returncode == 1
    assert _kvtier("serve", "--warm-capacity", "lots").returncode == 2
