"""Restart: a clean close/reopen keeps everything on disk; a SIGKILLed writer loses no durable put."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest
from tiering_helpers import BLOCK, NS, config, payload, tokens_for

from kvtier.tiering import TieredStore, chain_keys

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent.parent

WRITER = textwrap.dedent("""
    import sys
    from tiering_helpers import NS, config, payload, tokens_for
    from kvtier.tiering import TieredStore

    data_dir, write_policy, sync = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    store = TieredStore(config(data_dir, write_policy=write_policy, durable_sync=sync, writer_batch=4))
    seq = 0
    while True:  # until SIGKILL
        blocks = [payload(seq, i) for i in range(2)]
        store.put(NS, tokens_for(seq, 2), blocks, session_id=f"s{seq}", durable=seq % 2 == 0)
        if seq % 2 == 0:
            print(seq, flush=True)  # this durable put has returned
        seq += 1
""")


@pytest.mark.parametrize("write_policy,sync", [("write_through", False), ("write_back", True)])
def test_sigkill_keeps_every_durable_put(data_dir, write_policy, sync):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, data_dir, write_policy, "1" if sync else "0"],
                            stdout=subprocess.PIPE, text=True, env=env)
    acked = []
    try:
        for line in proc.stdout:
            acked.append(int(line))
            if len(acked) >= 15:
                break
    finally:
        proc.send_signal(signal.SIGKILL)  # mid-stream: puts and commits are still going on
        proc.wait(10)
    assert len(acked) >= 15, "the writer died before acknowledging puts"
    with TieredStore(config(data_dir, write_policy=write_policy)) as store:  # the dead writer's lock is gone
        for seq in acked:
            keys = chain_keys(NS, tokens_for(seq, 2))
            for i, k in enumerate(keys):
                got = store.get(k)
                assert got is not None and got[1] == "cold", (seq, i)
                assert got[0].data.numpy().tobytes() == payload(seq, i)
            assert store.get_session("t", f"s{seq}").keys == keys
        assert store.check() == []


@pytest.mark.parametrize("write_policy", ["write_through", "write_back"])
def test_clean_restart(make_store, write_policy):
    s = make_store(write_policy=write_policy, hot_capacity=2 * BLOCK, warm_capacity=2 * BLOCK)
    keys = [s.put(NS, tokens_for(seq), [payload(seq)], session_id=f"s{seq}").keys[0] for seq in range(8)]
    s.close()
    s = make_store(write_policy=write_policy)
    on_disk = {k for k in keys if s.get(k) is not None}
    # close flushed the write queue and, in write-back, wrote what lived only in RAM
    assert on_disk == set(keys)
    assert sorted(x.session_id for x in s.sessions()) == [f"s{i}" for i in range(8)]
    assert s.namespace_of(NS.ns_id) == NS  # namespaces are reloaded
    assert s.invalidate("t", model="m") == len(on_disk)  # ... so invalidate-by-model works after a restart
