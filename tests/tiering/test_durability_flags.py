"""Durable puts reach the disk: the LMDB environment the store opens syncs every commit.

SIGKILL tests cannot see a missing fsync (the page cache survives a killed process), so these check
the environment itself: opened with ``sync`` and ``metasync`` on (LMDB then fsyncs data and meta
pages inside every commit, before a durable put returns) and without ``map_async``/``writemap``
(which would make the flush asynchronous), by default and through the server's settings."""

from __future__ import annotations

import os

from tiering_helpers import NS, cold_of, payload, tokens_for

from kvtier.service.server.config import Settings
from kvtier.tiering import StoreConfig, TieredStore
from kvtier.tiering.codec import Codec
from kvtier.tiering.cold import ColdTier

SYNCED = {"sync": True, "metasync": True, "map_async": False, "writemap": False}


def _flags(env) -> dict:
    return {k: env.flags()[k] for k in SYNCED}


def test_default_store_and_server_settings_sync_every_commit(tmp_path):
    assert StoreConfig().durable_sync and Settings.load(None).store.durable_sync
    cfg = Settings.load(None, store={"data_dir": tmp_path, "hot_device": "off", "warm_capacity": 0,
                                     "cold_capacity": 8 << 20}).store.to_store_config()
    with TieredStore(cfg) as s:
        assert _flags(cold_of(s).env) == SYNCED
        res = s.put(NS, tokens_for(1, 2), [payload(1, i) for i in range(2)], durable=True)
        assert s.where(res.keys[1]) == "cold"  # the durable put returned once committed (and synced)


def test_durable_sync_off_is_what_the_flags_would_show(tmp_path):
    # the control: the check above can fail
    cold = ColdTier(os.path.join(tmp_path, "cold"), 1 << 20, Codec(), durable_sync=False)
    try:
        assert _flags(cold.env) == {**SYNCED, "sync": False, "metasync": False}
    finally:
        cold.close()
