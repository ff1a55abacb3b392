"""tiering/store.py against a dict model: random put / get / delete / prefetch / restart sequences.

For both eviction policies and both write policies the machine checks that

* every get returns exactly the bytes put, or a miss that the configuration allows (the cold tier is
  large here, so nothing is ever evicted from disk: only write-back blocks that never left memory may
  be lost, and only across a restart — unless a durable put covered them);
* capacities are never exceeded (``store.check()`` is [] and used <= capacity for every tier);
* every pin is released: once prefetches are done and ``lease_s`` has passed, no lease is active.
"""

from __future__ import annotations

import shutil
import tempfile
import time

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from tiering_helpers import BLOCK, LAYOUT, NS, config, payload, tokens_for

from kvtier.tiering import SessionNotFound, TieredStore, chain_keys

LEASE_S = 0.05


def _blocks(seq: int, n: int, trim: int) -> tuple[list[int], list[bytes]]:
    """Token ids and payloads of sequence ``seq``: ``n`` blocks, the last ``trim`` tokens shorter."""
    toks = tokens_for(seq, n)[:n * LAYOUT.block_tokens - trim]
    bt = LAYOUT.block_tokens
    return toks, [payload(seq, i, min(bt, len(toks) - i * bt)) for i in range(n)]


class StoreMachine(RuleBasedStateMachine):
    policy = "lru"
    write_policy = "write_through"

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="kvtier-sm-")
        self.cfg = config(self.dir, policy=self.policy, write_policy=self.write_policy, hot_capacity=3 * BLOCK,
                          warm_capacity=4 * BLOCK, lease_s=LEASE_S, maintenance_s=0.02, cold_capacity=4 << 20)
        self.store = TieredStore(self.cfg)
        self.model: dict = {}  # key -> bytes put
        self.must: set = set()  # keys a get must find
        self.durable: set = set()  # keys whose durable put returned
        self.sessions: dict[str, list] = {}
        self.prefetches: list = []

    # -- rules ---------------------------------------------------------------------------------------
    @rule(seq=st.integers(0, 5), n=st.integers(1, 3), trim=st.integers(0, 3), durable=st.booleans(),
          session=st.sampled_from([None, "a", "b"]))
    def put(self, seq, n, trim, durable, session):
        toks, blocks = _blocks(seq, n, trim)
        res = self.store.put(NS, toks, blocks, durable=durable, session_id=session)
        assert res.keys == chain_keys(NS, toks)
        assert set(res.stored) | set(res.skipped_present) == set(res.keys)
        for k, b in zip(res.keys, blocks):
            assert self.model.setdefault(k, b) == b
            self.must.add(k)  # nothing is lost before a restart: disk is big, demotion keeps blocks
            if durable:
                self.durable.add(k)
        if session is not None:
            self.sessions[session] = res.keys

    @precondition(lambda self: self.model)
    @rule(data=st.data(), promote=st.booleans())
    def get(self, data, promote):
        key = data.draw(st.sampled_from(sorted(self.model, key=lambda k: k.digest)))
        got = self.store.get(key, promote=promote)
        if got is None:
            assert key not in self.must, "a block the configuration must keep was a miss"
        else:
            assert got[0].data.cpu().numpy().tobytes() == self.model[key]
            assert got[1] in self.store.tier_names()

    @rule()
    def get_unknown(self):
        assert self.store.get(chain_keys(NS, [424242])[0]) is None

    @precondition(lambda self: self.sessions)
    @rule(data=st.data(), erase=st.booleans())
    def delete_session(self, data, erase):
        sid = data.draw(st.sampled_from(sorted(self.sessions)))
        self._wait_prefetches()  # a load already in flight could bring an erased block back
        self.store.delete_session("t", sid, erase_blocks=erase)
        keys = self.sessions.pop(sid)
        with pytest.raises(SessionNotFound):
            self.store.get_session("t", sid)
        if erase:
            kept = {k for other in self.sessions.values() for k in other}  # shared blocks stay
            for k in set(keys) - kept:
                self.model.pop(k, None)
                self.must.discard(k)
                self.durable.discard(k)
                assert self.store.get(k) is None

    @precondition(lambda self: self.model)
    @rule(data=st.data(), resume=st.booleans())
    def prefetch(self, data, resume):
        if resume and self.sessions:
            sid = data.draw(st.sampled_from(sorted(self.sessions)))
            session, tiers, handle = self.store.resume("t", sid)
            assert session.keys == self.sessions[sid] and len(tiers) == len(session.keys)
        else:
            keys = data.draw(st.lists(st.sampled_from(sorted(self.model, key=lambda k: k.digest)), max_size=4))
            handle = self.store.prefetch(keys)
        self.prefetches.append(handle)

    @rule()
    def restart(self):
        self._wait_prefetches()
        self.store.close()
        self.store = TieredStore(self.cfg)
        if self.write_policy == "write_back":
            self.must &= self.durable  # blocks that never left memory are gone; durable ones are not
        for sid, keys in self.sessions.items():
            assert self.store.get_session("t", sid).keys == keys

    # -- invariants -----------------------------------------------------------------------------------
    @invariant()
    def accounting(self):
        assert self.store.check() == []
        for name, u in self.store.usage().items():
            assert u["used_bytes"] <= u["capacity_bytes"], name

    def _wait_prefetches(self):
        for h in self.prefetches:
            assert h.future.result(10) >= 0
        self.prefetches.clear()

    def teardown(self):
        try:
            self._wait_prefetches()
            deadline = time.monotonic() + 5
            while self.store.leases.active() and time.monotonic() < deadline:
                time.sleep(LEASE_S)
            assert self.store.leases.active() == 0, "a pin outlived its lease"
            assert self.store.snapshot()["inflight_loads"] == 0
        finally:
            self.store.close()
            shutil.rmtree(self.dir, ignore_errors=True)


def _machine(policy: str, write_policy: str, examples: int):
    cls = type(f"Store_{policy}_{write_policy}", (StoreMachine,), {"policy": policy, "write_policy": write_policy})
    cls.TestCase.settings = settings(max_examples=examples, stateful_step_count=25, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])
    return cls.TestCase


TestLruWriteThrough = _machine("lru", "write_through", 12)
TestLruWriteBack = _machine("lru", "write_back", 12)
TestS3fifoWriteThrough = _machine("s3fifo", "write_through", 12)
TestS3fifoWriteBack = _machine("s3fifo", "write_back", 12)


@pytest.mark.stress
@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
@pytest.mark.parametrize("write_policy", ["write_through", "write_back"])
def test_stateful_soak(policy, write_policy):
    case = _machine(policy, write_policy, 300)
    case.settings = settings(case.settings, stateful_step_count=60)
    case("runTest").runTest()
