"""SIGKILL the server at random moments under load; what it acknowledged as durable comes back.

Each trial: start (or restart) the server on the same data directory, run the driver
(``tests/fixtures/crash_driver.py``) for a seeded random 0.3-2 s, SIGKILL the server, restart it,
time the restart to SERVING, and check the ledger: every durable session complete and byte-exact,
every durable block byte-exact, no checksum failure, no session pointing at a block that vanished
(write-through). The ledger grows across trials, so later trials also re-check earlier ones.
``KVTIER_STRESS=1`` runs 20 trials per write policy; the normal run 3 write-through trials.
"""

from __future__ import annotations

import logging
import random
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from tests.fixtures.crash_driver import NS_PB, Driver, Ledger, check_get, payload_for, verify_after_restart, _blocks
from tests.fixtures.server import KVTierProcess
from kvtier.tiering.codec import checksum

log = logging.getLogger(__name__)
SEED = 20260127


def start_timed(proc: KVTierProcess) -> float:
    """Start ``proc`` and return seconds from launch until health says SERVING."""
    t0 = time.monotonic()
    proc.start()
    with grpc.insecure_channel(proc.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            resp = health.Check(health_pb2.HealthCheckRequest(service="kvtier.v1.KVCache"), timeout=10)
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                return time.monotonic() - t0
            time.sleep(0.01)


def run_trials(tmp_path, n_trials: int, write_policy: str, record_property) -> None:
    rng = random.Random(SEED)
    proc = KVTierProcess(tmp_path / write_policy, extra_env={"KVTIER_STORE__WRITE_POLICY": write_policy,
                                                           "KVTIER_STORE__DURABLE_SYNC": "true"})
    ledger = Ledger()
    restarts = []
    start_timed(proc)
    try:
        for trial in range(n_trials):
            driver = Driver(proc.target, ledger, seed=rng.randrange(2**32), prefix=f"t{trial}").start()
            time.sleep(rng.uniform(0.3, 2.0))
            assert proc.stop(signal.SIGKILL) == -signal.SIGKILL
            driver.stop()
            assert driver.error is None, f"trial {trial}: the client saw a wrong answer: {driver.error!r}"
            restarts.append(start_timed(proc))
            seen = verify_after_restart(proc.target, ledger, volatile_complete=write_policy == "write_through")
            log.info("trial %d: ops %s; after restart (%.2f s) %s", trial, ledger.ops, restarts[-1], seen)
        assert ledger.ops.get("put_durable", 0) > 0 and ledger.durable_keys
        assert "Traceback" not in proc.log_text(), proc.log_text()[-3000:]
    finally:
        proc.kill()
    record_property("restart_s", restarts)
    log.warning("%s: %d SIGKILL trials, restart to SERVING: min %.2f s, median %.2f s, max %.2f s (%d durable "
                "blocks, %d sessions checked)", write_policy, n_trials, min(restarts),
                sorted(restarts)[len(restarts) // 2], max(restarts), len(ledger.durable_keys), len(ledger.sessions))


def test_sigkill_trials_keep_every_durable_promise(tmp_path, record_property):
    run_trials(tmp_path, 3, "write_through", record_property)


@pytest.mark.stress
@pytest.mark.parametrize("write_policy", ["write_through", "write_back"])
def test_sigkill_trials_stress(tmp_path, record_property, write_policy):
    run_trials(tmp_path, 20, write_policy, record_property)


def test_durable_put_after_non_durable_prefix_survives_sigkill_in_write_back(kvtier_process):
    """A durable Put that sends only the new blocks (first_block > 0) makes the whole chain durable,
    even when the earlier blocks came in a non-durable Put and sit in memory only (write-back)."""
    proc = kvtier_process("wb", extra_env={"KVTIER_STORE__WRITE_POLICY": "write_back"}).start()
    tokens = list(range(1000, 1064))  # 4 full blocks
    blocks = _blocks(tokens)

    def put(first, count, durable):
        def messages():
            yield pb.PutRequest(header=pb.PutHeader(namespace=NS_PB, token_ids=tokens[:16 * (first + count)],
                                                    session_id="wb", durable=durable, first_block=first,
                                                    block_count=count))
            for i in range(first, first + count):
                data = payload_for(blocks[i][0], blocks[i][1])
                yield pb.PutRequest(chunk=pb.BlockChunk(block_index=i, data=data, checksum=checksum(data)))
        return messages()

    with grpc.insecure_channel(proc.target) as channel:
        from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2_grpc as pb_grpc
        kv = pb_grpc.KVCacheStub(channel)
        kv.Put(put(0, 2, durable=False), timeout=30)
        kv.Put(put(2, 2, durable=True), timeout=30)
    proc.stop(signal.SIGKILL)
    proc.start()
    with grpc.insecure_channel(proc.target) as channel:
        from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2_grpc as pb_grpc
        got, end, _ = check_get(pb_grpc.KVCacheStub(channel).Get(pb.GetRequest(session_id="wb"), timeout=30))
    assert end.complete and len(got) == 4, f"durable session lost its prefix: {end}"
