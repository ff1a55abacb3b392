"""A client that drives a kvtier server until it dies, and a ledger of what the server promised.

:class:`Ledger` records what was acknowledged: a durable Put's blocks and session must survive any
crash; a non-durable one promises nothing. Payloads are a function of their block key
(:func:`payload_for`), so any block the server ever serves can be checked byte-exact without
remembering it. :class:`Driver` runs a seeded mix of durable and non-durable Puts (new sessions and
extensions of existing ones, sending only the new blocks), Gets, Resumes and Lookups on a thread,
verifying every answer, until a call fails (the server was killed) or it is told to stop.
:func:`verify_after_restart` checks the ledger against a restarted server.
"""

from __future__ import annotations

import contextlib
import random
import threading
from dataclasses import dataclass, field

import grpc
import numpy as np

from kvtier.service._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service._gen.kvtier.v1 import kvtier_pb2_grpc as pb_grpc
from tests.service.wire import collect_get
from kvtier.tiering.codec import checksum
from kvtier.tiering.keys import BlockKey, Namespace, chain_keys
from kvtier.tiering.layout import BlockLayout

T = 10
LAYOUT = BlockLayout("float16", 4, 2, 64, 16)  # 16 KiB blocks
NS = Namespace("default", "crash/model", "r1", LAYOUT)
NS_PB = pb.Namespace(model=NS.model, revision=NS.revision,
                     layout=pb.BlockLayout(dtype=LAYOUT.dtype, layers=LAYOUT.layers, kv_heads=LAYOUT.kv_heads,
                                           head_dim=LAYOUT.head_dim, block_tokens=LAYOUT.block_tokens))


def payload_for(key: BlockKey, tokens: int) -> bytes:
    """The bytes the client stores under ``key``: derived from the key, so any served block is checkable."""
    rng = np.random.default_rng(int.from_bytes(key.digest[:8], "little"))
    return rng.integers(0, 256, LAYOUT.block_bytes(tokens), dtype=np.uint8).tobytes()


@dataclass
class SessionState:
    tokens: list[int]
    durable: bool
    #: the chain (keys) as last acknowledged, and one sent but not acknowledged when the server died
    acked: list[BlockKey] | None = None
    in_flight: list[BlockKey] | None = None


@dataclass
class Ledger:
    sessions: dict[str, SessionState] = field(default_factory=dict)
    durable_keys: dict[BlockKey, int] = field(default_factory=dict)  # key -> tokens
    ops: dict[str, int] = field(default_factory=dict)

    def count(self, op: str) -> None:
        self.ops[op] = self.ops.get(op, 0) + 1


def _blocks(tokens: list[int]) -> list[tuple[BlockKey, int]]:
    bt = LAYOUT.block_tokens
    return [(k, min(bt, len(tokens) - i * bt)) for i, k in enumerate(chain_keys(NS, tokens))]


def check_get(responses) -> tuple[list[bytes], pb.GetEnd, list[pb.BlockHeader]]:
    """Collect a Get (checksums verified by ``collect_get``) and check each block against its key."""
    got = collect_get(responses)
    for h, data in zip(got.headers, got.blocks):
        assert checksum(data) == h.checksum
        tokens = h.shape[3]
        assert data == payload_for(BlockKey(h.key), tokens), f"block {h.key.hex()} served with wrong bytes"
    return got.blocks, got.end, got.headers


class Driver:
    """Runs the workload on a thread against ``target`` until a call fails or :meth:`stop`."""

    def __init__(self, target: str, ledger: Ledger, seed: int, prefix: str) -> None:
        self.ledger = ledger
        self.rng = random.Random(seed)
        self.prefix = prefix
        self.channel = grpc.insecure_channel(target)
        self.kv = pb_grpc.KVCacheStub(self.channel)
        self.error: BaseException | None = None  # a failed check (not a dead server)
        self.died: grpc.RpcError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"crash-driver-{prefix}", daemon=True)
        self._n = 0

    def start(self) -> "Driver":
        self._thread.start()
        return self

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self.channel.close()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._step()
        except grpc.RpcError as err:
            if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                  grpc.StatusCode.DEADLINE_EXCEEDED):
                self.error = err
            self.died = err
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def _step(self) -> None:
        r = self.rng.random()
        sessions = self.ledger.sessions
        # Only sessions some Put acknowledged may be asked for: one whose first Put was cut off by a
        # crash never existed, and NOT_FOUND is then the right answer, not a broken promise.
        acked = sorted(s for s, st in sessions.items() if st.acked is not None)
        if r < 0.45 or not acked:
            self._put(durable=self.rng.random() < 0.5)
        elif r < 0.75:
            sid = self.rng.choice(acked)
            with self._volatile_may_be_gone(sessions[sid]):
                blocks, _end, _ = check_get(self.kv.Get(pb.GetRequest(session_id=sid), timeout=T))
            self.ledger.count("get")
        elif r < 0.9:
            sid = self.rng.choice(acked)
            st = sessions[sid]
            resp = None
            with self._volatile_may_be_gone(st):
                resp = self.kv.Resume(pb.ResumeRequest(session_id=sid), timeout=T)
            if resp is None:
                return
            chains = [c for c in (st.acked, st.in_flight) if c is not None]
            assert [BlockKey(k) for k in resp.keys] in chains or not st.durable, "resume returned an unknown chain"
            self.ledger.count("resume")
        else:
            st = sessions[self.rng.choice(acked)]
            self.kv.Lookup(pb.LookupRequest(namespace=NS_PB, token_ids=st.tokens), timeout=T)
            self.ledger.count("lookup")

    @contextlib.contextmanager
    def _volatile_may_be_gone(self, st: "SessionState"):
        """A non-durable session may have been lost in an earlier crash: NOT_FOUND is allowed for it."""
        try:
            yield
        except grpc.RpcError as err:
            if st.durable or err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            self.ledger.count("volatile_gone")

    def _put(self, durable: bool) -> None:
        sessions = self.ledger.sessions
        mine = [s for s, st in sessions.items() if st.durable == durable and s.startswith(self.prefix)]
        bt = LAYOUT.block_tokens
        if mine and self.rng.random() < 0.5:  # extend: send only the blocks after the full ones held
            sid = self.rng.choice(mine)
            st = sessions[sid]
            tokens = st.tokens + [self.rng.randrange(50_000) for _ in range(self.rng.randrange(1, 3 * bt))]
            first = len(st.tokens) // bt
        else:
            self._n += 1
            sid = f"{self.prefix}-{'d' if durable else 'v'}{self._n}"
            st = sessions[sid] = SessionState([], durable)
            tokens = [self.rng.randrange(50_000) for _ in range(self.rng.randrange(1, 4 * bt))]
            first = 0
        blocks = _blocks(tokens)
        chain = [k for k, _ in blocks]
        st.in_flight = chain

        def messages():
            yield pb.PutRequest(header=pb.PutHeader(namespace=NS_PB, token_ids=tokens, session_id=sid, durable=durable,
                                                    first_block=first, block_count=len(blocks) - first))
            for i, (key, n) in enumerate(blocks[first:], start=first):
                data = payload_for(key, n)
                yield pb.PutRequest(chunk=pb.BlockChunk(block_index=i, offset=0, data=data, checksum=checksum(data)))

        self.kv.Put(messages(), timeout=T)
        st.tokens, st.acked, st.in_flight = tokens, chain, None
        if durable:
            self.ledger.durable_keys.update(blocks)
        self.ledger.count("put_durable" if durable else "put")


def verify_after_restart(target: str, ledger: Ledger, *, volatile_complete: bool) -> dict[str, int]:
    """Check a restarted server against the ledger; returns counts of what was checked.

    * every durable session exists and Get returns it complete (its acknowledged chain, or the one in
      flight at the crash), byte-exact;
    * every block of an acknowledged durable Put is served byte-exact by key;
    * a non-durable session may be gone; if it exists, every block it serves is byte-exact, and with
      ``volatile_complete`` (write-through: its blocks commit with or before it) it is complete;
    * no tier counted a checksum failure.
    """
    seen = {"durable_sessions": 0, "volatile_sessions": 0, "volatile_lost": 0, "durable_blocks": 0}
    with grpc.insecure_channel(target) as channel:
        kv = pb_grpc.KVCacheStub(channel)
        for sid, st in sorted(ledger.sessions.items()):
            if st.durable and st.acked is None:
                continue  # its first Put was never acknowledged: nothing was promised
            try:
                blocks, end, headers = check_get(kv.Get(pb.GetRequest(session_id=sid), timeout=T))
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.NOT_FOUND and not st.durable, (sid, err)
                seen["volatile_lost"] += 1
                continue
            chain = [BlockKey(h.key) for h in headers]
            if st.durable:
                assert end.complete, f"durable session {sid} lost blocks: stopped at {end.stopped_at} ({end.reason})"
                assert chain in [c for c in (st.acked, st.in_flight) if c is not None], f"{sid}: unknown chain"
                seen["durable_sessions"] += 1
            else:
                if volatile_complete:
                    assert end.complete, f"session {sid} points at a block that vanished ({end.reason})"
                seen["volatile_sessions"] += 1
        keys = list(ledger.durable_keys)
        for at in range(0, len(keys), 100):
            part = keys[at:at + 100]
            blocks, end, _ = check_get(kv.Get(pb.GetRequest(keys=pb.KeyList(keys=[k.digest for k in part])), timeout=T))
            assert end.complete, f"durable block {part[end.stopped_at].hex()} is gone"
            seen["durable_blocks"] += len(blocks)
        stats = kv.Stats(pb.StatsRequest(), timeout=T)
        assert all(t.checksum_failures == 0 for t in stats.tiers), stats
    return seen
