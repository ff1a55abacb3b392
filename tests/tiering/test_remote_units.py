"""The remote tier's pure parts: config validation and timeouts, the part layout, the breaker, session values."""

from __future__ import annotations

import logging

import pytest

from kvtier.tiering.keys import BlockKey
from kvtier.tiering.remote import RemoteConfig, records, sessions
from kvtier.tiering.remote.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


def test_config_validates_and_hides_the_password():
    cfg = RemoteConfig(seeds=("10.0.0.1:7000", "[::1]:7001"), password="s3cret", username="kv", tls=True,
                       tls_ca="/ca.pem", min_throughput_bps=1e6, base_timeout_s=0.5)
    assert "s3cret" not in repr(cfg)
    assert cfg.timeout(2_000_000) == pytest.approx(2.5)
    kw = cfg.cluster_kwargs()
    assert kw["ssl"] is True and kw["ssl_ca_certs"] == "/ca.pem" and kw["username"] == "kv"
    assert "ssl" not in RemoteConfig(seeds=("h:1",)).cluster_kwargs()
    for bad in ({"seeds": ()}, {"seeds": ("nohost",)}, {"seeds": ("h:1",), "key_prefix": "a{b"},
                {"seeds": ("h:1",), "write": "sometimes"}, {"seeds": ("h:1",), "max_part_bytes": 10}):
        with pytest.raises(ValueError):
            RemoteConfig(**bad)
    assert RemoteConfig(seeds=("h:1",), large_write_bytes=100, write_retries=3).retries_for(100) == 1


@pytest.mark.parametrize("size", [1, 4096 - 44, 4096 - 43, 3 * 4096, 3 * 4096 + 1])
def test_parts_split_and_join_exactly(size):
    k = BlockKey(bytes(16))
    record = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    parts = records.split(k, record, 4096)
    assert len(parts) == records.parts_needed(size, 4096) and all(len(p) <= 4096 for p in parts)
    values = [bytes(p) for p in parts]
    assert records.join(k, values).record == record
    assert records.join(k, values[:1] + [None] * (len(values) - 1)).status in ("ok", "missing")
    assert records.join(BlockKey(b"\1" * 16), values).status == "corrupt"
    if len(values) > 1:
        assert records.join(k, values[:1]).status == "more"


def test_part_names_share_one_hash_tag():
    names = records.part_names(records.block_base("p:", BlockKey(b"\xab" * 16)), 3)
    assert names[0] == b"p:{" + b"ab" * 16 + b"}" and names[2] == names[0] + b":2"


def test_breaker_opens_half_opens_and_closes(caplog):
    now = [0.0]
    b = CircuitBreaker(3, 1.0, clock=lambda: now[0], log_interval_s=0.0)
    with caplog.at_level(logging.WARNING, logger="kvtier.tiering.remote"):
        for _ in range(3):
            assert b.allow()
            b.record(False, "timeout")
        assert b.state == OPEN and not b.allow()
        now[0] = 1.5
        assert b.allow() and b.state == HALF_OPEN
        assert not b.allow()  # one probe at a time
        b.record(False, "timeout")
        assert b.state == OPEN
        now[0] = 3.0
        assert b.allow()
        b.record(True)
        assert b.state == CLOSED and b.allow()
    assert any("closed -> open" in r.getMessage() for r in caplog.records)
    assert b.opened == 2


def test_breaker_log_is_rate_limited(caplog):
    now = [0.0]
    b = CircuitBreaker(1, 0.0, clock=lambda: now[0], log_interval_s=60.0)
    with caplog.at_level(logging.WARNING, logger="kvtier.tiering.remote"):
        for _ in range(5):
            b.allow()
            b.record(False, "connection")
            b.allow()
            b.record(True)
    assert len(caplog.records) == 1


def test_session_values_bind_the_session_and_version():
    value = sessions.pack(b"t\0a", b"{}", 42)
    assert sessions.unpack(b"t\0a", value) == (b"{}", 42)
    assert sessions.unpack(b"t\0b", value) is None  # another session's value
    assert sessions.unpack(b"t\0a", value[:-1] + b"]") is None
    assert sessions.version_text(7) < sessions.version_text(10**18)  # compares as strings in Lua
