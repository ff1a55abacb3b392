"""The torch dtype of every element type kvtier stores: the one dtype→torch map of the engine.

Imports torch and :mod:`tiering.layout` only (no LMDB, zstd or threads), so clients may use it.
"""

from __future__ import annotations

import torch

from .errors import InvalidBlock
from .layout import DTYPES

#: dtype name (a key of :data:`tiering.layout.DTYPES`) → torch dtype.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
    "uint8": torch.uint8, "int8": torch.int8,
}
assert set(TORCH_DTYPES) == set(DTYPES), "every stored dtype needs its torch dtype"


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of ``name``.

    :raises InvalidBlock: if kvtier does not store that dtype.
    """
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise InvalidBlock(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}",
                           field="layout.dtype") from None
