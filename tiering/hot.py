"""The hot tier: KV blocks resident in GPU memory, ready for attention without a copy.
Imports torch, ``memory``, ``policies`` only.

``device = "auto"`` picks ``cuda:0`` when torch sees a GPU and otherwise switches the tier off with
one log line; ``"cpu"`` runs the same logic on host memory so tests exercise it on any machine.
"""

from __future__ import annotations

import logging

import torch

from .memory import MemoryTier
from .policies import make_policy

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device | None:
    """The device the hot tier should use, or ``None`` when it must be off.

    :param device: ``auto``, ``off``, ``cpu``, ``cuda`` or ``cuda:N``.
    :raises ValueError: if a CUDA device is asked for explicitly and none is usable.
    """
    if device == "off":
        return None
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        log.info("hot tier off: torch sees no CUDA device (set store.hot_device = 'cpu', or --hot-device cpu, to exercise it on the host)")
        return None
    dev = torch.device(device)
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"store.hot_device={device!r} but torch sees {torch.cuda.device_count()} CUDA device(s); "
                         "use store.hot_device = \"auto\" (--hot-device auto) to switch the hot tier off without a GPU")
    return dev


def make_hot_tier(device: str, capacity: int, policy: str) -> MemoryTier | None:
    """The hot tier on ``device`` (see :func:`resolve_device`), or ``None`` when it is off or empty."""
    dev = resolve_device(device)
    if dev is None or capacity <= 0:
        return None
    return MemoryTier("hot", dev, capacity, make_policy(policy))
