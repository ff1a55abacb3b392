"""What the remote tier's writes report: per-key outcomes, and the error of a durable write that failed.

Imports only tiering's keys and errors.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..errors import TierUnavailable
from ..keys import BlockKey


class WriteOutcome(str, enum.Enum):
    """What became of one write."""

    DURABLE = "durable"  # on the shard's primary and acknowledged by min_replicas replicas (WAIT)
    WRITTEN = "written"  # on the shard's primary; replicas not (yet) confirmed
    QUEUED = "queued"  # accepted by the asynchronous writer
    DROPPED = "dropped"  # not written (remote unreachable, out of memory, queue full, breaker open)
    SKIPPED = "skipped"  # the write mode says not to write it
    STALE = "stale"  # a session write lost to a newer version already stored


@dataclass(frozen=True, slots=True)
class PutResult:
    """Per-key outcome of :meth:`RemoteTier.put_many`."""

    outcomes: dict[BlockKey, WriteOutcome]

    @property
    def all_durable(self) -> bool:
        return all(o is WriteOutcome.DURABLE for o in self.outcomes.values())


class RemoteWriteFailed(TierUnavailable):
    """A durable remote write did not reach its primary and ``min_replicas`` replicas in time.

    ``result`` holds the per-key outcome (some keys may be durable). Maps to gRPC ``UNAVAILABLE``.
    """

    def __init__(self, message: str, result: PutResult | None = None) -> None:
        super().__init__(message)
        self.result = result
