"""Store configurations that pin blocks in one tier, for the server subprocess and the in-process engine.

* ``hot``: GPU tier first (only with CUDA), warm below it, ``write_back`` so nothing goes to disk;
* ``warm``: hot off, a warm tier big enough for every block, ``write_back``;
* ``cold``: hot and warm off, so every Put is a durable LMDB write and every Get an LMDB read plus
  decode (no promotion anywhere to hide it).

Both the server (``KVTIER_STORE__*`` env vars) and the engine (:func:`store_config`) are built from the
same :class:`service.config.StoreSettings` values, so the two paths measure the same store.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kvtier.service.server.config import StoreSettings
from kvtier.tiering.config import StoreConfig
from kvtier.tiering.dtypes import torch_dtype
from kvtier.tiering.layout import BlockLayout

_COMMON = {"cold_capacity": "16GiB", "durable_sync": "false", "prefetch_threads": "2"}
SETTINGS: dict[str, dict[str, str]] = {
    "hot": {**_COMMON, "hot_device": "cuda:0", "hot_capacity": "4GiB", "warm_capacity": "4GiB",
            "write_policy": "write_back"},
    "warm": {**_COMMON, "hot_device": "off", "warm_capacity": "4GiB", "write_policy": "write_back"},
    "cold": {**_COMMON, "hot_device": "off", "warm_capacity": "0"},
}


def available() -> list[str]:
    """Tiers this machine can measure: hot only with CUDA."""
    return (["hot"] if torch.cuda.is_available() else []) + ["warm", "cold"]


def store_config(tier: str, data_dir: Path) -> StoreConfig:
    """The engine config of ``tier`` (same values as the server gets)."""
    return StoreSettings(data_dir=data_dir, **SETTINGS[tier]).to_store_config()


def payload(layout: BlockLayout, seed: int = 0) -> np.ndarray:
    """One full block of ``layout`` as flat uint8: seeded standard-normal values in the layout's dtype
    (as compressible as real activations roughly are; every path moves these same bytes)."""
    n = layout.block_bytes() // layout.itemsize
    values = torch.from_numpy(np.random.default_rng(seed).standard_normal(n, dtype=np.float32))
    dtype = torch_dtype(layout.dtype)
    return values.to(dtype).view(torch.uint8).numpy().copy()


def block_tokens(layout: BlockLayout, index: int) -> np.ndarray:
    """Token ids of one full block, distinct for every ``index`` (so puts are never deduplicated)."""
    bt = layout.block_tokens
    return np.arange(index * bt, (index + 1) * bt, dtype=np.uint32)
