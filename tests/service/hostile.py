"""Hostile and malformed requests, as data: the table ``tests/service/test_hostile_inputs.py`` replays.

Each :class:`Case` is a name, the status code the server must answer, and a callable that makes the
call over a real channel (raising ``grpc.RpcError`` on a non-OK status). Puts use :data:`BAD_NS` /
:data:`BAD_TOKS` unless their namespace is the point, and every valid namespace a bad Put names is
listed in :data:`PUT_TARGETS`, so the test can check that none of them left a block behind.

Raw cases send hand-built wire bytes (``raw_*``): the Python protobuf runtime refuses to serialize a
``string`` field that is not UTF-8, so those messages are built by hand from a valid one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from kvtier.service._gen.kvtier.v1 import kvtier_pb2 as pb
from tests.service.wire import collect_get, namespace, put_stream, random_blocks, tokens
from kvtier.tiering.codec import checksum

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
CANCELLED = grpc.StatusCode.CANCELLED
T = 30

BAD_NS = namespace(model="hostile/model", tenant="hostile")
BAD_TOKS = tokens(40, seed=31)  # 3 blocks of 16 tokens, the last partial (8 tokens)
BAD_PAYLOADS = random_blocks(BAD_NS, 40, seed=31)
#: (namespace, tokens) of every well-formed namespace a bad Put names: none may gain a block.
PUT_TARGETS: list[tuple[pb.Namespace, list[int]]] = [(BAD_NS, BAD_TOKS)]

#: A tenant of its own: data the table must leave intact (nothing in the table names it).
KEEP_TENANT = "keeper-tenant-7f3a"
KEEP_NS = namespace(model="hostile/kept", tenant=KEEP_TENANT)
KEEP_TOKS = tokens(48, seed=32)
KEEP_PAYLOADS = random_blocks(KEEP_NS, 48, seed=32)


@dataclass(frozen=True)
class Case:
    name: str
    code: grpc.StatusCode
    call: Callable[[grpc.Channel], None]


def _kv(channel):
    from kvtier.service._gen.kvtier.v1 import kvtier_pb2_grpc as pb_grpc
    return pb_grpc.KVCacheStub(channel)


def _header(**kw) -> pb.PutHeader:
    fields = dict(namespace=BAD_NS, token_ids=BAD_TOKS, block_count=3)
    fields.update(kw)
    return pb.PutHeader(**fields)


def _chunk(index, offset, data, csum=0) -> pb.PutRequest:
    return pb.PutRequest(chunk=pb.BlockChunk(block_index=index, offset=offset, data=data, checksum=csum))


def _put(messages) -> Callable[[grpc.Channel], None]:
    msgs = list(messages)
    return lambda ch: _kv(ch).Put(iter(msgs), timeout=T)


def _unary(method: str, request) -> Callable[[grpc.Channel], None]:
    return lambda ch: getattr(_kv(ch), method)(request, timeout=T)


def _get(request) -> Callable[[grpc.Channel], None]:
    return lambda ch: collect_get(_kv(ch).Get(request, timeout=T))


def _raw(kind: str, method: str, payloads: list[bytes]) -> Callable[[grpc.Channel], None]:
    """Send hand-built bytes to ``/kvtier.v1.KVCache/<method>`` (unary, unary-stream or stream-unary)."""
    ident = lambda b: b  # noqa: E731
    path = f"/kvtier.v1.KVCache/{method}"

    def call(ch):
        if kind == "unary":
            ch.unary_unary(path, request_serializer=ident, response_deserializer=ident)(payloads[0], timeout=T)
        elif kind == "server_stream":
            list(ch.unary_stream(path, request_serializer=ident, response_deserializer=ident)(payloads[0], timeout=T))
        else:
            ch.stream_unary(path, request_serializer=ident, response_deserializer=ident)(iter(payloads), timeout=T)
    return call


def _non_utf8(msg, text: str) -> bytes:
    """``msg`` serialized, with the UTF-8 of ``text`` (a unique marker) replaced by invalid bytes."""
    raw = msg.SerializeToString()
    marker = text.encode()
    assert raw.count(marker) == 1
    return raw.replace(marker, b"\xff\xfe" + bytes(len(marker) - 2))


def _cancelled_put(ch) -> None:
    """Send a header and half a block, then cancel: the server must store nothing."""
    gate = threading.Event()

    def messages():
        yield pb.PutRequest(header=_header())
        yield _chunk(0, 0, BAD_PAYLOADS[0][:1000])
        gate.wait(10)

    fut = _kv(ch).Put.future(messages(), timeout=T)
    try:
        fut.result(timeout=0.5)
    except grpc.FutureTimeoutError:
        pass
    fut.cancel()
    gate.set()
    fut.result(timeout=T)  # raises the CANCELLED RpcError


def _cancelled_get(ch) -> None:
    """Read the first message of a Get of the kept session, then cancel (its lease must be released)."""
    it = _kv(ch).Get(pb.GetRequest(session_id="kept", tenant=KEEP_TENANT), timeout=T)
    next(it)
    it.cancel()
    list(it)  # raises the CANCELLED RpcError


def _bad_puts():
    good = list(put_stream(_header(), BAD_PAYLOADS))
    blocks1 = 2 * 4 * 2 * 16 * 64 * 2  # bytes of one full block of BAD_NS
    huge = namespace(dtype="float32", layers=64, kv_heads=64, head_dim=256, block_tokens=16, model="hostile/huge")
    huge_toks = tokens(160, seed=33)  # 10 blocks of 128 MiB
    PUT_TARGETS.append((huge, huge_toks))
    other_dtype = namespace(dtype="uint8", model="hostile/model", tenant="hostile")
    PUT_TARGETS.append((other_dtype, BAD_TOKS))
    yield "put: empty stream", INVALID, _put([])
    yield "put: first message has no oneof", INVALID, _put([pb.PutRequest()])
    yield "put: empty message after header", INVALID, _put([good[0], pb.PutRequest()])
    yield "put: header without namespace", INVALID, _put([pb.PutRequest(header=_header(namespace=None))])
    yield "put: namespace without layout", INVALID, \
        _put([pb.PutRequest(header=_header(namespace=pb.Namespace(model="hostile/model")))])
    for dtype in ("", "FLOAT16", "complex64", "float16 "):
        yield f"put: dtype {dtype!r}", INVALID, _put([pb.PutRequest(header=_header(namespace=namespace(dtype=dtype)))])
    for field_, value in (("layers", 0), ("kv_heads", 65537), ("head_dim", 0), ("block_tokens", 0),
                          ("block_tokens", 2**32 - 1)):
        yield f"put: layout.{field_}={value}", INVALID, \
            _put([pb.PutRequest(header=_header(namespace=namespace(**{field_: value})))])
    yield "put: layout of 32 GiB blocks", INVALID, \
        _put([pb.PutRequest(header=_header(namespace=namespace(layers=65536, kv_heads=65536)))])
    yield "put: model of 257 bytes", INVALID, _put([pb.PutRequest(header=_header(namespace=namespace(model="m" * 257)))])
    yield "put: NUL in model", INVALID, _put([pb.PutRequest(header=_header(namespace=namespace(model="a\0b")))])
    yield "put: revision of 300 bytes", INVALID, \
        _put([pb.PutRequest(header=_header(namespace=pb.Namespace(model="m", revision="r" * 300, layout=BAD_NS.layout)))])
    yield "put: tenant of 300 bytes", INVALID, _put([pb.PutRequest(header=_header(namespace=namespace(tenant="t" * 300)))])
    yield "put: NUL in session id", INVALID, _put([pb.PutRequest(header=_header(session_id="s\0"))])
    yield "put: session id 258 UTF-8 bytes in 129 chars", INVALID, _put([pb.PutRequest(header=_header(session_id="é" * 129))])
    for ttl in (-1.0, float("nan"), float("inf")):
        yield f"put: ttl_seconds {ttl}", INVALID, _put([pb.PutRequest(header=_header(ttl_seconds=ttl))])
    yield "put: block_count 2**32-1", INVALID, _put([pb.PutRequest(header=_header(block_count=2**32 - 1))])
    yield "put: first_block 2**32-1", INVALID, _put([pb.PutRequest(header=_header(first_block=2**32 - 1))])
    yield "put: first_block+block_count past the end", INVALID, _put([pb.PutRequest(header=_header(first_block=2, block_count=2))])
    yield "put: chunk when zero blocks declared", INVALID, _put([pb.PutRequest(header=_header(block_count=0)), good[1]])
    yield "put: header only, blocks declared", INVALID, _put(good[:1])
    yield "put: payload short of the shape", INVALID, _put([good[0], _chunk(0, 0, BAD_PAYLOADS[0][:-2]),
                                                           _chunk(1, 0, BAD_PAYLOADS[1])])
    yield "put: partial block sent full size", INVALID, _put(good[:3] + [_chunk(2, 0, bytes(blocks1))])
    yield "put: repeated offset", INVALID, _put([good[0], _chunk(0, 0, BAD_PAYLOADS[0][:100]),
                                                 _chunk(0, 0, BAD_PAYLOADS[0][100:])])
    yield "put: offset 2**63", INVALID, _put([good[0], _chunk(0, 2**63, b"x")])
    yield "put: empty chunk", INVALID, _put([good[0], _chunk(0, 0, b"")])
    yield "put: checksum on a middle chunk", INVALID, _put([good[0], _chunk(0, 0, BAD_PAYLOADS[0][:100], 7)])
    yield "put: 2 MiB chunk", INVALID, _put([good[0], _chunk(0, 0, bytes(2 << 20))])
    yield "put: block index repeats", INVALID, _put(good[:2] + [_chunk(0, 0, BAD_PAYLOADS[0])])
    yield "put: block index skips", INVALID, _put(good[:2] + [_chunk(2, 0, BAD_PAYLOADS[2])])
    yield "put: checksum of block 0 wrong", INVALID, \
        _put([good[0], _chunk(0, 0, BAD_PAYLOADS[0], checksum(BAD_PAYLOADS[0]) ^ 0xFF)] + good[2:])
    yield "put: uint8 payload under a float16 size", INVALID, \
        _put([pb.PutRequest(header=_header(namespace=other_dtype)), _chunk(0, 0, BAD_PAYLOADS[0])])
    yield "put: declares 1.25 GiB", EXHAUSTED, \
        _put([pb.PutRequest(header=pb.PutHeader(namespace=huge, token_ids=huge_toks, block_count=10))])
    yield "put: 12 MiB header (token ids)", EXHAUSTED, _put([pb.PutRequest(header=_header(token_ids=[2**31] * 2_500_000))])
    yield "put: non-UTF-8 session id", INVALID, \
        _raw("client_stream", "Put", [_non_utf8(pb.PutRequest(header=_header(session_id="SESSION-MARK")), "SESSION-MARK")])
    yield "put: non-UTF-8 model", INVALID, \
        _raw("client_stream", "Put", [_non_utf8(pb.PutRequest(header=_header(namespace=namespace(model="MODEL-MARK"))),
                                                "MODEL-MARK")])
    yield "put: garbage wire bytes", INVALID, _raw("client_stream", "Put", [b"\xff\xff\xff\xff"])
    yield "put: garbage after a good header", INVALID, _raw("client_stream", "Put", [good[0].SerializeToString(), b"\x0a\xff"])
    yield "put: cancelled mid-block", CANCELLED, _cancelled_put


def _bad_reads():
    k16 = bytes(range(16))
    yield "lookup: no namespace", INVALID, _unary("Lookup", pb.LookupRequest(token_ids=[1, 2]))
    yield "lookup: neither tokens nor keys", INVALID, _unary("Lookup", pb.LookupRequest(namespace=BAD_NS))
    yield "lookup: tokens and keys", INVALID, _unary("Lookup", pb.LookupRequest(namespace=BAD_NS, token_ids=[1], keys=[k16]))
    yield "lookup: 15-byte key", INVALID, _unary("Lookup", pb.LookupRequest(namespace=BAD_NS, keys=[k16[:15]]))
    yield "lookup: 17-byte key", INVALID, _unary("Lookup", pb.LookupRequest(namespace=BAD_NS, keys=[k16 + b"x"]))
    yield "lookup: duplicate keys", INVALID, _unary("Lookup", pb.LookupRequest(namespace=BAD_NS, keys=[k16, k16]))
    yield "lookup: unknown dtype", INVALID, _unary("Lookup", pb.LookupRequest(namespace=namespace(dtype="int4"), token_ids=[1]))
    yield "lookup: token id 2**32-1 is valid", OK, _unary("Lookup", pb.LookupRequest(namespace=BAD_NS, token_ids=[2**32 - 1] * 20))
    yield "lookup: 64-bit varint token id is truncated, valid", OK, \
        _raw("unary", "Lookup", [pb.LookupRequest(namespace=BAD_NS).SerializeToString() + b"\x12\x05" + b"\xff\xff\xff\xff\x7f"])
    yield "lookup: 1M token ids", OK, _unary("Lookup", pb.LookupRequest(namespace=BAD_NS, token_ids=[7] * 1_000_000))
    yield "lookup: non-UTF-8 model", INVALID, \
        _raw("unary", "Lookup", [_non_utf8(pb.LookupRequest(namespace=namespace(model="MODEL-MARK"), token_ids=[1]), "MODEL-MARK")])
    yield "lookup: garbage wire bytes", INVALID, _raw("unary", "Lookup", [b"\x0a\x05\x01"])
    yield "get: empty session id", INVALID, _get(pb.GetRequest(session_id=""))
    yield "get: empty key list", INVALID, _get(pb.GetRequest(keys=pb.KeyList()))
    yield "get: session id of 257 bytes", INVALID, _get(pb.GetRequest(session_id="s" * 257))
    yield "get: tenant of 300 bytes", INVALID, _get(pb.GetRequest(session_id="kept", tenant="t" * 300))
    yield "get: start_block 2**32-1", INVALID, _get(pb.GetRequest(session_id="kept", tenant=KEEP_TENANT, start_block=2**32 - 1))
    yield "get: another tenant's session", NOT_FOUND, _get(pb.GetRequest(session_id="kept", tenant="hostile"))
    yield "get: unknown keys end with a miss", OK, _get(pb.GetRequest(keys=pb.KeyList(keys=[k16])))
    yield "get: non-UTF-8 session id", INVALID, \
        _raw("server_stream", "Get", [_non_utf8(pb.GetRequest(session_id="SESSION-MARK"), "SESSION-MARK")])
    yield "get: garbage wire bytes", INVALID, _raw("server_stream", "Get", [b"\x12\xff\x01"])
    yield "get: cancelled mid-stream", CANCELLED, _cancelled_get
    yield "resume: empty session id", INVALID, _unary("Resume", pb.ResumeRequest())
    yield "resume: session id of 300 bytes", INVALID, _unary("Resume", pb.ResumeRequest(session_id="s" * 300))
    yield "resume: NUL in session id", INVALID, _unary("Resume", pb.ResumeRequest(session_id="a\0"))
    yield "resume: unknown session", NOT_FOUND, _unary("Resume", pb.ResumeRequest(session_id="hostile-none"))
    yield "resume: non-UTF-8 session id", INVALID, \
        _raw("unary", "Resume", [_non_utf8(pb.ResumeRequest(session_id="SESSION-MARK"), "SESSION-MARK")])
    yield "resume: non-UTF-8 tenant", INVALID, \
        _raw("unary", "Resume", [_non_utf8(pb.ResumeRequest(session_id="x", tenant="TENANT-MARK"), "TENANT-MARK")])
    yield "prefetch: no target", INVALID, _unary("Prefetch", pb.PrefetchRequest())
    yield "prefetch: 3-byte key", INVALID, _unary("Prefetch", pb.PrefetchRequest(keys=pb.KeyList(keys=[b"abc"])))
    yield "prefetch: duplicate keys", INVALID, _unary("Prefetch", pb.PrefetchRequest(keys=pb.KeyList(keys=[k16, k16])))
    yield "prefetch: unknown session", NOT_FOUND, _unary("Prefetch", pb.PrefetchRequest(session_id="hostile-none", wait=True))
    yield "delete: empty session id", INVALID, _unary("DeleteSession", pb.DeleteSessionRequest())
    yield "delete: NUL in tenant", INVALID, _unary("DeleteSession", pb.DeleteSessionRequest(session_id="x", tenant="\0"))
    yield "delete: unknown session", NOT_FOUND, _unary("DeleteSession", pb.DeleteSessionRequest(session_id="hostile-none"))
    yield "invalidate: no target", INVALID, _unary("Invalidate", pb.InvalidateRequest())
    yield "invalidate: model ref without model", INVALID, _unary("Invalidate", pb.InvalidateRequest(model=pb.ModelRef(revision="r")))
    yield "invalidate: model of 300 bytes", INVALID, _unary("Invalidate", pb.InvalidateRequest(model=pb.ModelRef(model="m" * 300)))
    yield "invalidate: namespace without layout", INVALID, \
        _unary("Invalidate", pb.InvalidateRequest(namespace=pb.Namespace(model="hostile/none")))
    yield "invalidate: namespace never used", OK, \
        _unary("Invalidate", pb.InvalidateRequest(namespace=namespace(model="hostile/never-used")))
    yield "stats: garbage wire bytes", INVALID, _raw("unary", "Stats", [b"\xff"])


def cases() -> list[Case]:
    """The whole table (fresh each call: the callables hold no state between calls)."""
    PUT_TARGETS[1:] = []
    return [Case(n, c, f) for n, c, f in (*_bad_puts(), *_bad_reads())]
