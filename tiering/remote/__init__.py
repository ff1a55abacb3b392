"""The remote tier: a shared Redis Cluster below the cold tier (see ``remote_tier.RemoteTier``).

Exports the tier, its config and its result types; imports nothing from ``service/``.
"""

from .config import WRITE_MODES, RemoteConfig
from .remote_tier import PutResult, RemoteTier, RemoteWriteFailed, WriteOutcome

__all__ = ["WRITE_MODES", "PutResult", "RemoteConfig", "RemoteTier", "RemoteWriteFailed", "WriteOutcome"]
