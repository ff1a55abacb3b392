"""No secret or tensor byte leaves through logs, spans or metrics.

A real server at DEBUG, exporting every span to an OTLP receiver run here and serving Prometheus
metrics, with an encrypted cold tier, takes authenticated (and some rejected) puts, gets, lookups and
resumes carrying a distinctive bearer token, token-id sequence and payload marker. Then the log
file, the exported spans (serialized) and the metrics page are searched for any of them.
"""

from __future__ import annotations

import socket
import struct
import time
import urllib.request

import grpc
import pytest

from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from tests.fixtures import wire
from tests.fixtures.otlp import otlp_receiver  # noqa: F401 - a fixture
TOKEN = "tok-SECRET-5b7e9d21c4"
WRONG_TOKEN = "tok-WRONG-0c0ffee42"
COLD_KEY = "a1b2c3d4" * 8
TOKEN_IDS = [31337, 27182, 16180, 14142, 17320, 22360, 26457, 30000] * 4  # 32 tokens = 2 blocks
MARKER = bytes.fromhex("deadbeefcafef00d0badc0de8badf00d")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _payloads(ns: pb.Namespace) -> list[bytes]:
    out = []
    for data in wire.random_blocks(ns, len(TOKEN_IDS), seed=5):
        out.append((MARKER * (len(data) // len(MARKER) + 1))[:len(data)])  # all marker: any slice shows it
    return out


def test_tokens_token_ids_and_payload_never_leak(kvtier_process, otlp_receiver, tmp_path):
    rec, endpoint = otlp_receiver
    metrics_port = _free_port()
    tokens_file = tmp_path / "tokens.toml"
    tokens_file.write_text(f'[tokens]\n"{TOKEN}" = "leaky"\n')
    proc = kvtier_process(extra_env={
        "KVTIER_LOG_LEVEL": "DEBUG", "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_TRACES_SAMPLER": "always_on",
        "KVTIER_TELEMETRY__METRICS_PORT": str(metrics_port), "KVTIER_SECURITY__TOKENS_FILE": str(tokens_file),
        "KVTIER_COLD_KEY": COLD_KEY}).start()
    ns = wire.namespace(model="leak/model")
    payloads = _payloads(ns)
    good, bad = (("authorization", f"Bearer {TOKEN}"),), (("authorization", f"Bearer {WRONG_TOKEN}"),)
    channel, stub = wire.stub(proc.target)
    with channel:
        header = pb.PutHeader(namespace=ns, token_ids=TOKEN_IDS, block_count=2, session_id="sess", durable=True)
        put = stub.Put(wire.put_stream(header, payloads), metadata=good, timeout=30)
        got = wire.collect_get(stub.Get(pb.GetRequest(keys=pb.KeyList(keys=put.keys)), metadata=good, timeout=30))
        assert got.blocks == payloads
        stub.Lookup(pb.LookupRequest(namespace=ns, token_ids=TOKEN_IDS), metadata=good, timeout=30)
        stub.Resume(pb.ResumeRequest(session_id="sess"), metadata=good, timeout=30)
        for call in (lambda: stub.Put(wire.put_stream(header, payloads), metadata=bad, timeout=30),
                     lambda: stub.Lookup(pb.LookupRequest(namespace=ns, token_ids=TOKEN_IDS), metadata=bad,
                                         timeout=30),
                     lambda: stub.Put(wire.put_stream(header, [payloads[0][:-1], payloads[1]]), metadata=good,
                                      timeout=30)):
            with pytest.raises(grpc.RpcError):
                call()
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        metrics = resp.read()
    assert proc.stop() == 0  # flushes the spans on the way out
    deadline = time.monotonic() + 10
    while not rec.blobs and time.monotonic() < deadline:
        time.sleep(0.05)

    log = proc.log_path.read_bytes()
    spans = b"".join(rec.blobs)
    assert b"DEBUG" in log and b"/kvtier.v1.KVCache/Put" in spans  # the sinks did record this traffic
    ids_text = ", ".join(map(str, TOKEN_IDS[:4])).encode()
    ids_packed = [struct.pack(f"<4{c}", *TOKEN_IDS[:4]) for c in "IQ"]
    secrets = {"bearer token": [TOKEN.encode(), WRONG_TOKEN.encode()], "cold key": [COLD_KEY.encode()],
               "token ids": [ids_text, ids_text.replace(b", ", b","), *ids_packed],
               "payload": [MARKER, MARKER.hex().encode(), repr(MARKER)[2:-1].encode()]}
    for sink_name, sink in (("log", log), ("spans", spans), ("metrics", metrics)):
        for what, needles in secrets.items():
            for needle in needles:
                assert needle not in sink, f"{what} found in the {sink_name}"
