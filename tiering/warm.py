"""The warm tier: KV blocks in host RAM, page-locked when CUDA is present.
Imports torch, ``memory``, ``policies`` only.

Pinned (page-locked) buffers let host→device copies run asynchronously at full PCIe/NVLink speed; on
a machine without CUDA pinning is impossible and pointless, so plain pageable memory is used.
"""

from __future__ import annotations

import torch

from .memory import MemoryTier
from .policies import make_policy


def make_warm_tier(capacity: int, policy: str, pin: str = "auto") -> MemoryTier | None:
    """The warm tier, or ``None`` when its capacity is 0.

    :param pin: ``auto`` (pin when CUDA is available), ``on`` or ``off``.
    """
    if capacity <= 0:
        return None
    pin_memory = torch.cuda.is_available() if pin == "auto" else pin == "on"
    return MemoryTier("warm", "cpu", capacity, make_policy(policy), pin_memory=pin_memory)
