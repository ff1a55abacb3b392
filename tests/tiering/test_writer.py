"""tiering/writer.py: the cold writer commits jobs in order, in batches, and survives a failing commit."""

from __future__ import annotations

from concurrent.futures import Future
from unittest import mock

import pytest
from test_cold import K, block

from kvtier.tiering.errors import TierUnavailable
from kvtier.tiering.writer import ColdWriter, WriteJob


def test_writer_commits_in_order_and_reports(cold):
    commits = []
    w = ColdWriter(cold, batch=4, threads=2, protected=lambda k: False,
                   on_commit=lambda jobs, ev, err: commits.append((len(jobs), err)))
    futs = [w.submit(WriteJob(blocks=[(K(i), block(i))])) for i in range(10)]
    w.flush()
    assert [f.result() for f in futs] == [1] * 10 and all(err is None for _, err in commits)
    assert cold.block_count() == 10
    w.close()
    w.close()  # idempotent
    with pytest.raises(TierUnavailable):
        w.submit(WriteJob())


def test_writer_survives_a_failing_commit(cold):
    errors = []
    w = ColdWriter(cold, batch=4, threads=1, protected=lambda k: False,
                   on_commit=lambda jobs, ev, err: errors.append(err))
    with mock.patch.object(cold, "write_batch", side_effect=OSError("disk on fire")):
        fut: Future = w.submit(WriteJob(blocks=[(K(1), block(1))]))
        with pytest.raises(TierUnavailable, match="disk on fire"):
            fut.result(5)
    assert w.submit(WriteJob(blocks=[(K(2), block(2))])).result(5) == 1  # the thread lives on
    assert isinstance(errors[0], TierUnavailable) and errors[-1] is None
    w.close()
