"""Hostile and malformed requests against a real server: precise codes, no damage, no leak.

The table (``tests/fixtures/hostile.py``, 90+ cases, none repeated from ``test_server_errors.py``)
runs once case by case, then once more as a whole while the server's memory is watched. After it:
the server still serves, data stored before is intact byte-exact, none of the bad Puts left a block
(Lookup finds none), no lease is left pinned. Then hypothesis fuzzes request fields and raw bytes:
every answer is OK or a client-error code, never INTERNAL or UNKNOWN, and the server stays up.
"""

from __future__ import annotations

import logging
import statistics
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2_grpc as pb_grpc
from tests.fixtures import hostile
from tests.fixtures.server import KVTierProcess
from tests.fixtures.wire import collect_get, put_stream

log = logging.getLogger(__name__)
T = 30
CASES = hostile.cases()
#: Codes a client error may get; anything else (INTERNAL, UNKNOWN, UNAVAILABLE...) is a server bug.
CLIENT_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.RESOURCE_EXHAUSTED}
#: What the allocator does (VmRSS after each pass, MiB: 281, 295, 314, 317, 318, 314, 315, 320, 314,
#: 320, 316, 320): glibc arenas and gRPC buffer pools settle over ~3 passes (a pass sends ~40 MiB: two
#: 12 MiB over-size messages, a 2 MiB chunk, a 1M-token Lookup), then RSS wanders within ~6 MiB with
#: no trend, except for rare one-off steps (+17.7 MiB once in 8 runs) when an arena first reaches a
#: new peak. A step happens once; a leak grows RSS at every pass. So the check is the MEDIAN growth
#: from one measured pass to the next: up to two one-off steps among the six deltas leave it in the
#: noise (the worst six-delta window of the series above: +2.5 MiB), while a leak puts every delta, so
#: the median, above the bound: the big cases' buffers (24 MiB of rejected messages per pass), or
#: 96 KiB per request (planted once to check: median +7.9 MiB a pass, failed). A leak under ~5 MiB a
#: pass (50 KiB per request) passes: the noise is that large.
PER_PASS_GROWTH_BOUND = 5 << 20
WARMUP_PASSES = 4
MEASURED_PASSES = 7


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from ``/proc/<pid>/status`` (VmRSS, kB)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def outcome(call, channel) -> grpc.StatusCode:
    try:
        call(channel)
    except grpc.FutureCancelledError:
        return grpc.StatusCode.CANCELLED
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = KVTierProcess(tmp_path_factory.mktemp("hostile")).start()
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def channel(server):
    ch = grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20),
                                                      ("grpc.max_receive_message_length", 16 << 20)])
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def kv(channel):
    kv = pb_grpc.KVCacheStub(channel)
    kv.Put(put_stream(pb.PutHeader(namespace=hostile.KEEP_NS, token_ids=hostile.KEEP_TOKS, block_count=3,
                                   session_id="kept", durable=True), hostile.KEEP_PAYLOADS), timeout=T)
    return kv


def _intact(kv) -> None:
    got = collect_get(kv.Get(pb.GetRequest(session_id="kept", tenant=hostile.KEEP_TENANT), timeout=T))
    assert got.blocks == hostile.KEEP_PAYLOADS and got.end.complete


def test_table_is_large_and_names_unique():
    assert len(CASES) >= 50
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_request_gets_its_precise_code(server, channel, kv, case):
    assert outcome(case.call, channel) == case.code
    assert server.proc.poll() is None, server.log_text()[-3000:]
    kv.Stats(pb.StatsRequest(), timeout=T)


def _after_checks(server, kv) -> None:
    _intact(kv)
    for ns, toks in hostile.PUT_TARGETS:
        look = kv.Lookup(pb.LookupRequest(namespace=ns, token_ids=toks), timeout=T)
        assert look.cached_blocks == 0, f"a rejected Put left blocks of {ns.model} behind"
    end = time.monotonic() + 10
    while kv.Stats(pb.StatsRequest(), timeout=T).pinned_blocks and time.monotonic() < end:
        time.sleep(0.2)
    assert kv.Stats(pb.StatsRequest(), timeout=T).pinned_blocks == 0, "a lease outlived its RPC"
    assert "Traceback" not in server.log_text(), server.log_text()[-3000:]


def test_after_the_table_nothing_is_damaged_and_memory_is_stable(server, channel, kv):
    _after_checks(server, kv)
    def one_pass() -> int:
        assert [outcome(c.call, channel) for c in hostile.cases()] == [c.code for c in CASES]
        time.sleep(0.3)
        return rss_bytes(server.proc.pid)

    warm = [one_pass() for _ in range(WARMUP_PASSES)]
    measured = [one_pass() for _ in range(MEASURED_PASSES)]
    growth = statistics.median(b - a for a, b in zip(measured, measured[1:]))
    log.warning("server RSS (MiB) after each pass of %d hostile requests: warm-up %s, measured %s; median growth "
                "%+.1f MiB a pass", len(CASES), [round(r / 2**20, 1) for r in warm],
                [round(r / 2**20, 1) for r in measured], growth / 2**20)
    assert growth < PER_PASS_GROWTH_BOUND, "server memory grows at every pass of the table: a leak"
    _after_checks(server, kv)


# -- property-based fuzzing ---------------------------------------------------------------------------
_u32 = st.one_of(st.sampled_from([0, 1, 2, 16, 255, 65536, 65537, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
_text = st.one_of(st.sampled_from(["", "kept", "a\0b", "x" * 257, "é" * 129, "default"]),
                  st.text(st.characters(blacklist_categories=("Cs",)), max_size=300))
_dtype = st.one_of(st.sampled_from(["float16", "float32", "bfloat16", "uint8", "int8", "float8_e4m3fn"]), _text)
_layout = st.builds(pb.BlockLayout, dtype=_dtype, layers=st.integers(0, 70), kv_heads=st.integers(0, 9),
                    head_dim=st.integers(0, 300), block_tokens=st.one_of(st.integers(0, 40), _u32))
_ns = st.one_of(st.none(), st.builds(pb.Namespace, model=_text, revision=_text, layout=st.one_of(st.none(), _layout),
                                     tenant=_text))
_tokens = st.lists(_u32, max_size=100)
_keys = st.lists(st.one_of(st.binary(min_size=16, max_size=16), st.binary(max_size=20)), max_size=5)
_chunk = st.builds(pb.BlockChunk, block_index=_u32, offset=st.one_of(st.integers(0, 2**64 - 1), st.just(0)),
                   data=st.binary(max_size=64), checksum=st.integers(0, 2**64 - 1))
_header = st.builds(pb.PutHeader, namespace=_ns, session_id=_text, token_ids=_tokens, durable=st.booleans(),
                    first_block=_u32, block_count=st.one_of(st.integers(0, 4), _u32),
                    priority=st.integers(-2**31, 2**31 - 1), ttl_seconds=st.floats(allow_nan=True))
_target = st.one_of(st.builds(lambda k: {"keys": pb.KeyList(keys=k)}, _keys), st.builds(lambda s: {"session_id": s}, _text),
                    st.just({}))


def _fuzz_call(kind, args):
    def call(ch):
        kv = pb_grpc.KVCacheStub(ch)
        if kind == "lookup":
            kv.Lookup(pb.LookupRequest(namespace=args[0], token_ids=args[1], keys=args[2]), timeout=T)
        elif kind == "get":
            collect_get(kv.Get(pb.GetRequest(tenant=args[1], start_block=args[2], max_blocks=args[3], **args[0]),
                               timeout=T))
        elif kind == "resume":
            kv.Resume(pb.ResumeRequest(tenant=args[0], session_id=args[1], prefetch_budget_ms=args[2]), timeout=T)
        elif kind == "prefetch":
            kv.Prefetch(pb.PrefetchRequest(tenant=args[1], budget_ms=args[2] % 5000, wait=False, **args[0]), timeout=T)
        elif kind == "delete":
            kv.DeleteSession(pb.DeleteSessionRequest(tenant=args[0], session_id=args[1]), timeout=T)
        elif kind == "put":
            kv.Put(iter([pb.PutRequest(header=args[0])] + [pb.PutRequest(chunk=c) for c in args[1]]), timeout=T)
        else:  # raw bytes to any method
            method, raw = args
            ident = lambda b: b  # noqa: E731
            path = f"/kvtier.v1.KVCache/{method}"
            if method == "Get":
                list(ch.unary_stream(path, request_serializer=ident, response_deserializer=ident)(raw, timeout=T))
            elif method == "Put":
                ch.stream_unary(path, request_serializer=ident, response_deserializer=ident)(iter([raw]), timeout=T)
            else:
                ch.unary_unary(path, request_serializer=ident, response_deserializer=ident)(raw, timeout=T)
    return call


_requests = st.one_of(
    st.tuples(st.just("lookup"), st.tuples(_ns, _tokens, _keys)),
    st.tuples(st.just("get"), st.tuples(_target, _text, _u32, _u32)),
    st.tuples(st.just("resume"), st.tuples(_text, _text, _u32)),
    st.tuples(st.just("prefetch"), st.tuples(_target, _text, _u32)),
    st.tuples(st.just("delete"), st.tuples(_text, _text)),
    st.tuples(st.just("put"), st.tuples(_header, st.lists(_chunk, max_size=3))),
    st.tuples(st.just("raw"), st.tuples(st.sampled_from(["Lookup", "Get", "Resume", "Prefetch", "Stats", "Put"]),
                                        st.binary(max_size=80))),
)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(request=_requests)
def test_fuzzed_requests_get_client_codes_never_internal(server, channel, kv, request):
    kind, args = request
    code = outcome(_fuzz_call(kind, args), channel)
    assert code in CLIENT_CODES, (kind, args, code)
    assert server.proc.poll() is None


def test_server_survives_the_fuzzing(server, kv):
    _intact(kv)
    assert "Traceback" not in server.log_text(), server.log_text()[-3000:]
