"""tiering/session_records.py: records queued with blocks, readable at once, disk hidden until committed."""

from __future__ import annotations


from tiering_helpers import NS

from kvtier.tiering.session_records import SessionRecords
from kvtier.tiering.sessions import Session, session_id_key
from kvtier.tiering.writer import WriteJob


def test_pending_session_records_hide_disk_until_all_committed(durable):
    """delete, put, delete of one session queued; the writer commits them one at a time. Until the
    last is on disk the session must read as deleted, never as the record queued in between."""
    records = SessionRecords(durable)
    sid = session_id_key("t", "x")
    record = Session("t", "x", NS, [], 0).to_json()
    jobs = [WriteJob(), WriteJob(), WriteJob()]
    for job, rec in zip(jobs, [None, record, None]):
        records.submit({sid: rec}, job)  # queued (the jobs are committed by hand below)
    for job in jobs[:2]:
        durable.cold.write_batch([], sessions=job.sessions)
        records.committed([job], [], None)
        assert records.load(sid) is None
    durable.cold.write_batch([], sessions=jobs[2].sessions)
    records.committed([jobs[2]], [], None)
    assert records.all() == [] and records.queued() == 0


def test_a_record_is_readable_before_its_commit_and_counted(durable):
    records = SessionRecords(durable)
    sid = session_id_key("t", "a")
    fut = records.submit({sid: Session("t", "a", NS, [], 4).to_json()})
    assert records.load(sid).tokens == 4 and records.count("t") == 1
    fut.result(5)
    durable.flush()
    assert durable.session_get(sid) is not None and records.count("t") == 1 and records.count("u") == 0


def test_update_is_a_read_modify_write(durable):
    records = SessionRecords(durable)
    sid = session_id_key("t", "b")
    records.update(sid, lambda old: Session("t", "b", NS, [], 1 if old is None else old.tokens + 1))
    records.update(sid, lambda old: Session("t", "b", NS, [], old.tokens + 1))
    records.update(sid, lambda old: None)  # leaves it as it is
    assert records.load(sid).tokens == 2


def test_without_a_durable_tier_records_live_in_memory():
    records = SessionRecords(None)
    sid = session_id_key("t", "m")
    assert records.submit({sid: Session("t", "m", NS, [], 3).to_json()}) is None
    assert records.load(sid).tokens == 3 and records.count("t") == 1 and len(records.all()) == 1
    records.submit({sid: None})
    assert records.load(sid) is None and records.all() == []
