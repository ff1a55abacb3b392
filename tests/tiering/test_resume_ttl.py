"""Resume refreshes a session's ``last_used``, so a TTL'd session that is resumed before it expires
outlives its original expiry (the sweeper runs all along)."""

from __future__ import annotations

import time

from tiering_helpers import NS, payload, tokens_for

TTL_S = 4.0


def _wait_until(t: float) -> None:
    while time.time() <= t:
        time.sleep(0.02)


def test_resume_extends_the_life_of_a_ttl_session(make_store):
    s = make_store(maintenance_s=0.05)
    s.put(NS, tokens_for(1, 2), [payload(1, i) for i in range(2)], session_id="s", ttl_s=TTL_S, durable=True)
    before = s.get_session("t", "s")
    original_expiry = before.last_used + TTL_S
    _wait_until(before.last_used + TTL_S / 2)
    session, _tiers, handle = s.resume("t", "s")
    assert handle.future.result(10) >= 0
    refreshed = s.get_session("t", "s")
    assert refreshed.last_used > before.last_used
    assert refreshed.last_used >= before.last_used + TTL_S / 2  # refreshed at the resume, not before
    assert not refreshed.expired(original_expiry + 0.5)
    _wait_until(original_expiry + 0.5)  # the sweeper has run many times past the original expiry
    assert s.get_session("t", "s").keys == before.keys
    assert [x.session_id for x in s.sessions()] == ["s"]
