"""The ``kvtier`` CLI against a running server: ``stats`` and read-only ``inspect`` of a held data dir."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from kvtier.service import __version__

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


# ----------------------------------------------------------------------------------------------------
# issue 14: what an operator meets first
def _one_clean_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for noise in ("Traceback", "Event loop is closed", "add_port", "errors.pydantic.dev", "[Errno"):
        assert noise not in done.stderr, done.stderr
    return lines[0]


def test_version():
    done = _kvtier("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"kvtier {__version__}"


def test_settings_errors_are_one_line_naming_the_source(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
    done = subprocess.run([sys.executable, "-m", "service", "serve"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**env, "KVTIER_STORE__WARM_CAPACTY": "1GiB"})
    assert done.returncode == 2
    assert _one_clean_line(done) == ("kvtier: unknown setting store.warm_capacty (env KVTIER_STORE__WARM_CAPACTY); "
                                     "did you mean KVTIER_STORE__WARM_CAPACITY?")
    done = _kvtier("serve", "--warm-capacity", "lots")
    assert _one_clean_line(done).startswith("kvtier: invalid setting store.warm_capacity (flag --warm-capacity): ")


@pytest.mark.parametrize("flag,what", [("--port", "gRPC"), ("--metrics-port", "metrics")])
def test_a_taken_port_is_named_and_exits_1_cleanly(tmp_path, flag, what):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--port", "0"] if flag != "--port" else []
        done = _kvtier("serve", "--data-dir", str(tmp_path / "data"), *args, flag, str(port))
    assert done.returncode == 1
    assert _one_clean_line(done) == f"kvtier: could not start: {what} port {port} on 127.0.0.1 is already in use"


def test_stats_with_mutual_tls_and_an_admin_token(tmp_path):
    from tests.service.server.test_security_tls import Pki, TLSProcess

    pki = Pki(tmp_path / "pki")
    (tmp_path / "client.pem").write_bytes(pki.client_cert)
    (tmp_path / "client.key").write_bytes(pki.client_key)
    (tmp_path / "admin.token").write_text("cli-admin-token\n")
    proc = TLSProcess(tmp_path / "srv", extra_env={
        "KVTIER_SECURITY__TLS_CERT": pki.files["server.pem"], "KVTIER_SECURITY__TLS_KEY": pki.files["server.key"],
        "KVTIER_SECURITY__TLS_CLIENT_CA": pki.files["ca.pem"], "KVTIER_SECURITY__ADMIN_TOKENS": '["cli-admin-token"]'})
    proc.credentials = pki.client_credentials()
    proc.start()
    try:
        tls = ("--tls-ca", pki.files["ca.pem"], "--tls-cert", str(tmp_path / "client.pem"),
               "--tls-key", str(tmp_path / "client.key"))
        done = _kvtier("stats", "--target", proc.target, *tls, "--token-file", str(tmp_path / "admin.token"))
        assert done.returncode == 0, done.stderr
        assert "compression ratio" in done.stdout
        done = _kvtier("stats", "--target", proc.target, *tls, "--token", "wrong")
        assert done.returncode == 1 and "UNAUTHENTICATED" in done.stderr
        assert _kvtier("health", "--target", proc.target, *tls).returncode == 0
        assert _kvtier("health", "--target", proc.target).returncode == 1  # plaintext to a TLS server
    finally:
        proc.kill()
