"""Faults end in a clear error, never a crash loop or silent loss.

* the cold tier full with nothing evictable: RESOURCE_EXHAUSTED, and the server keeps serving;
* a read-only, missing-and-uncreatable, or busy data directory: ``kvtier serve`` exits 1 at once
  with a line saying what is wrong and what to do (``service/apps/cli.py``: 1 = could not start);
* a damaged ``data.mdb`` (truncated, or garbage): the same, naming the file. A truncated LMDB file
  used to kill the process with SIGBUS at every start (the memory map reaches past its end).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import grpc
import pytest
from google.rpc import error_details_pb2

from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from tests.fixtures.server import ROOT, SMALL_STORE_ENV
from tests.fixtures.wire import collect_get, details, namespace, put_stream, random_blocks, stub, tokens

T = 30
START_LIMIT = 60


def serve_once(data_dir, *, read_only_mount: bool = False, extra_env: dict | None = None) -> tuple[int, str]:
    """Run ``kvtier serve`` on ``data_dir`` expecting it to fail; returns (exit code, output).

    :param read_only_mount: run it in a mount namespace where ``data_dir`` is a read-only bind mount
        (root ignores file modes, so a chmod does not make a directory read-only for it).
    """
    env = {**os.environ, **SMALL_STORE_ENV, **(extra_env or {})}
    env.pop("KVTIER_CONFIG", None)
    cmd = [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", "0", "--data-dir", str(data_dir)]
    if read_only_mount:
        script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
        cmd = ["unshare", "-m", "sh", "-c", script, "sh", str(data_dir), *cmd]
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=START_LIMIT)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"kvtier kept running on a bad data directory:\n{exc.stdout}\n{exc.stderr}") from None
    return done.returncode, done.stdout + done.stderr


def _assert_clear_failure(code: int, output: str, *phrases: str) -> None:
    assert code == 1, f"exit code {code}:\n{output[-3000:]}"
    assert "could not start" in output
    assert "Traceback" not in output, output[-3000:]
    for phrase in phrases:
        assert phrase in output, f"{phrase!r} not in:\n{output[-3000:]}"


def _store_some(target: str, n_sessions: int = 4) -> list[list[bytes]]:
    channel, kv = stub(target)
    ns = namespace(model="faults/model")
    out = []
    with channel:
        for s in range(n_sessions):
            payloads = random_blocks(ns, 64, seed=s)
            kv.Put(put_stream(pb.PutHeader(namespace=ns, token_ids=tokens(64, seed=s), block_count=4, durable=True,
                                           session_id=f"f{s}"), payloads), timeout=T)
            out.append(payloads)
    return out


def test_cold_tier_full_of_pinned_blocks_is_resource_exhausted(kvtier_process):
    # 2 MiB map: records may use 0.8 * 2 MiB - 128 KiB ~ 1.5 MiB; six 256 KiB blocks nearly fill it.
    proc = kvtier_process("full", extra_env={"KVTIER_STORE__COLD_CAPACITY": "2MiB", "KVTIER_STORE__CODEC": "raw",
                                             "KVTIER_STORE__LEASE_S": "20"}).start()
    ns = namespace(dtype="float32", layers=8, kv_heads=4, head_dim=64, block_tokens=16)  # 256 KiB blocks
    channel, kv = stub(proc.target)
    with channel:
        first = random_blocks(ns, 80, seed=41)
        kv.Put(put_stream(pb.PutHeader(namespace=ns, token_ids=tokens(80, seed=41), block_count=5, durable=True,
                                       session_id="pinned"), first), timeout=T)
        # Pin every stored block: a prefetch's lease protects them from eviction for its lease time.
        kv.Prefetch(pb.PrefetchRequest(session_id="pinned", wait=True), timeout=T)
        assert kv.Stats(pb.StatsRequest(), timeout=T).pinned_blocks == 5
        with pytest.raises(grpc.RpcError) as err:
            kv.Put(put_stream(pb.PutHeader(namespace=ns, token_ids=tokens(48, seed=42), block_count=3, durable=True),
                              random_blocks(ns, 48, seed=42)), timeout=T)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        assert isinstance(details(err.value)[0], error_details_pb2.QuotaFailure)
        assert "full" in err.value.details()
        # Nothing lost, still serving.
        assert collect_get(kv.Get(pb.GetRequest(session_id="pinned"), timeout=T)).blocks == first
    assert proc.stop() == 0
    assert "Traceback" not in proc.log_text()


def test_read_only_data_dir_fails_with_a_clear_message(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    if os.geteuid() == 0:  # root ignores modes: make it a read-only mount instead
        if shutil.which("unshare") is None:
            pytest.skip("running as root without unshare(1): cannot make a read-only directory")
        code, output = serve_once(data, read_only_mount=True)
        if "mount:" in output or "unshare:" in output:
            pytest.skip(f"no mount namespace here: {output.strip()[:200]}")
    else:
        data.chmod(0o555)
        code, output = serve_once(data)
    _assert_clear_failure(code, output, repr(str(data)), "make it writable")
    assert "Read-only file system" in output or "Permission denied" in output


def test_uncreatable_data_dir_fails_with_a_clear_message(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, output = serve_once(blocker / "data")
    _assert_clear_failure(code, output, str(blocker / "data"), "pass another --data-dir")


def test_data_dir_held_by_another_server_fails_with_a_clear_message(kvtier_process):
    first = kvtier_process("first").start()
    code, output = serve_once(first.data_dir)
    _assert_clear_failure(code, output, "in use by another kvtier process", f"pid {first.proc.pid}")
    assert first.proc.poll() is None  # the first one is unharmed
    assert first.stop() == 0


@pytest.mark.parametrize("damage", ["truncated", "cut to one page", "garbage"])
def test_damaged_lmdb_file_fails_with_a_clear_message_not_a_crash(kvtier_process, damage):
    proc = kvtier_process("damaged").start()
    _store_some(proc.target)
    assert proc.stop() == 0
    mdb = proc.data_dir / "cold" / "data.mdb"
    size = mdb.stat().st_size
    if damage == "truncated":
        os.truncate(mdb, size // 2)
    elif damage == "cut to one page":
        os.truncate(mdb, 5000)
    else:
        mdb.write_bytes(os.urandom(size))
    for _ in range(2):  # the same answer every time: no crash loop, no half-start
        code, output = serve_once(proc.data_dir)
        assert code != -signal.SIGBUS, "SIGBUS: LMDB read past the end of the file"
        _assert_clear_failure(code, output, str(mdb), "move the", "backup")
