"""Domain errors of the tiered block store.
Imports the standard library only.

Raised inside ``tiering/`` and mapped to gRPC status codes exactly once, in ``service/server/errors.py``:

=====================  ======================
error                  gRPC status
=====================  ======================
``InvalidBlock``       ``INVALID_ARGUMENT``
``BlockNotFound``      ``NOT_FOUND``
``SessionNotFound``    ``NOT_FOUND``
``LayoutMismatch``     ``FAILED_PRECONDITION``
``CapacityExceeded``   ``RESOURCE_EXHAUSTED``
``TierUnavailable``    ``UNAVAILABLE``
=====================  ======================
"""

from __future__ import annotations


class KVTierError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidBlock(KVTierError, ValueError):
    """A request or a block is malformed (wrong size, unknown dtype, bad field).

    ``field`` names the offending field when there is one, so callers can say which.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class BlockNotFound(KVTierError, KeyError):
    """A block that must exist (for example a key named explicitly) is in no tier."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0]) if self.args else "block not found"


class SessionNotFound(BlockNotFound):
    """No session with this id exists for this tenant (or it expired)."""


class LayoutMismatch(KVTierError):
    """A block's layout or dtype disagrees with the namespace it is stored under."""


class CapacityExceeded(KVTierError):
    """Nothing more can be stored: every candidate for eviction is pinned, or a quota is reached."""


class TierUnavailable(KVTierError):
    """A tier cannot serve (closed store, data directory unusable, device gone)."""


class ChecksumError(KVTierError):
    """Stored bytes failed their checksum. Never leaves the engine: the block becomes a miss."""
