"""XXH3-64, the checksum kvtier stores with every block and sends with it on the wire.

Imports xxhash only (no LMDB, zstd or threads), so clients may use it.
"""

from __future__ import annotations

import numpy as np
import xxhash


def checksum(data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """XXH3-64 of ``data``: the checksum kvtier stores and sends with every block."""
    return xxhash.xxh3_64_intdigest(memoryview(data).cast("B") if not isinstance(data, bytes) else data)
