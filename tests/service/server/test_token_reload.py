"""SIGHUP re-reads ``security.tokens_file`` in a running ``kvtier serve``: removed tokens stop working,
added ones start, a file that does not load keeps the old tokens (one WARN line), no restart."""

from __future__ import annotations

import json
import signal
import time

import grpc
import pytest

from kvtier.service.server.auth import Authenticator, reload_tokens
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from tests.fixtures import wire
from tests.fixtures.server import KVTierProcess

OLD, NEW, ENV_TOKEN, ADMIN = "tok-old-1a2b", "tok-new-3c4d", "tok-env-5e6f", "tok-admin-7a8b"


def _code(stub, token: str) -> grpc.StatusCode:
    try:
        stub.Lookup(pb.LookupRequest(namespace=wire.namespace(model="reload/m"), token_ids=[1, 2, 3]),
                    metadata=(("authorization", f"Bearer {token}"),), timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _hup(proc: KVTierProcess, seen: int) -> str:
    """SIGHUP the server and wait for its ``seen + 1``-th SIGHUP log line; returns that line."""
    proc.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = [ln for ln in proc.log_text().splitlines() if "SIGHUP:" in ln]
        if len(lines) > seen:
            return lines[seen]
        time.sleep(0.05)
    raise AssertionError(f"no SIGHUP log line:\n{proc.log_text()[-3000:]}")


def test_sighup_swaps_the_tokens_of_a_running_server(tmp_path):
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps({"tokens": {OLD: "acme"}, "admin_tokens": [ADMIN]}))
    proc = KVTierProcess(tmp_path, extra_env={"KVTIER_SECURITY__TOKENS_FILE": str(tokens_file),
                                              "KVTIER_SECURITY__TOKENS": json.dumps({ENV_TOKEN: "envco"})}).start()
    try:
        channel, stub = wire.stub(proc.target)
        with channel:
            assert [_code(stub, t) for t in (OLD, NEW, ENV_TOKEN)] == [grpc.StatusCode.OK,
                                                                       grpc.StatusCode.UNAUTHENTICATED,
                                                                       grpc.StatusCode.OK]
            tokens_file.write_text(json.dumps({"tokens": {NEW: "acme"}, "admin_tokens": [ADMIN]}))
            line = _hup(proc, 0)
            assert "reloaded 2 tenant and 1 admin tokens" in line
            assert [_code(stub, t) for t in (OLD, NEW, ENV_TOKEN)] == [grpc.StatusCode.UNAUTHENTICATED,
                                                                       grpc.StatusCode.OK, grpc.StatusCode.OK]
            tokens_file.write_text("{not json")  # a bad edit: the old tokens stay
            line = _hup(proc, 1)
            assert "WARNING" in line and "tokens not reloaded" in line and str(tokens_file) in line
            assert [_code(stub, t) for t in (OLD, NEW)] == [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OK]
        assert proc.proc.poll() is None  # SIGHUP did not end it
        assert proc.stop() == 0
        log = proc.log_text()
        assert all(t not in log for t in (OLD, NEW, ENV_TOKEN, ADMIN))
    finally:
        proc.kill()


def test_a_reload_that_would_switch_auth_off_is_refused(tmp_path, caplog):
    from types import SimpleNamespace

    tokens_file = tmp_path / "tokens.toml"
    tokens_file.write_text("")
    security = SimpleNamespace(tokens={}, admin_tokens=[], tokens_file=tokens_file)
    auth = Authenticator({OLD: "acme"})
    assert not reload_tokens(auth, security)
    assert auth.authenticate((("authorization", f"Bearer {OLD}"),)).tenant == "acme"
    assert "would switch authentication off" in caplog.text
    tokens_file.write_text(f'[tokens]\n"{NEW}" = "acme"\n')
    assert reload_tokens(auth, security)
    assert auth.authenticate((("authorization", f"Bearer {NEW}"),)).tenant == "acme"
    with pytest.raises(Exception, match="unknown bearer token"):
        auth.authenticate((("authorization", f"Bearer {OLD}"),))
