"""The light vocabulary (keys, layout, dtypes, checksum): a client imports it without the engine."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kvtier.tiering.dtypes import TORCH_DTYPES, torch_dtype
from kvtier.tiering.errors import InvalidBlock
from kvtier.tiering.layout import DTYPES, blocks_for

PROBE = """
import sys
import kvtier.tiering.keys, kvtier.tiering.layout, kvtier.tiering.checksum, kvtier.tiering.errors
from kvtier.tiering import BlockKey, Namespace, chain_keys
heavy = sorted(m for m in ("lmdb", "zstandard", "kvtier.tiering.store", "kvtier.tiering.writer",
                           "concurrent.futures.thread", "opentelemetry") if m in sys.modules)
print(",".join(heavy))
"""


def test_vocabulary_imports_no_engine():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the vocabulary pulled in: {out.stdout.strip()}"


def test_package_still_exports_the_engine_lazily():
    import kvtier.tiering as t

    assert t.TieredStore.__name__ == "TieredStore" and "TieredStore" in dir(t)
    with pytest.raises(AttributeError):
        t.NoSuchThing  # noqa: B018


def test_every_dtype_has_its_torch_dtype():
    assert set(TORCH_DTYPES) == set(DTYPES)
    assert torch_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(InvalidBlock):
        torch_dtype("complex64")


@pytest.mark.parametrize("n,per,want", [(0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (8, 4, 2), (9, 16, 1)])
def test_blocks_for(n, per, want):
    assert blocks_for(n, per) == want
