"""Fixtures of the engine's tests: stores on a temporary data dir (helpers: ``tiering_helpers``)."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterator

import pytest
from tiering_helpers import config

from tests.fixtures import tracked

from kvtier.tiering import TieredStore
from kvtier.tiering.codec import Codec
from kvtier.tiering.cold import ColdTier
from kvtier.tiering.writebehind import WriteBehindTier


@pytest.fixture
def make_store(data_dir: str) -> Iterator[Callable[..., TieredStore]]:
    """Factory of stores on ``data_dir`` (same dir each call: close one before opening the next)."""
    with tracked(lambda **kw: TieredStore(config(kw.pop("data_dir", data_dir), **kw))) as make:
        yield make


@pytest.fixture
def tmp_dir(tmp_path: pathlib.Path) -> str:
    return os.fspath(tmp_path)


@pytest.fixture
def cold(tmp_dir: str) -> Iterator[ColdTier]:
    """A 1 MiB cold tier (no fsync) in ``tmp_dir``."""
    c = ColdTier(os.path.join(tmp_dir, "cold"), 1 << 20, Codec(), durable_sync=False)
    yield c
    c.close()


@pytest.fixture
def durable(cold: ColdTier) -> Iterator[WriteBehindTier]:
    """The write-behind tier over ``cold`` (nothing pinned); closing it closes ``cold``."""
    wb = WriteBehindTier(cold, batch=4, threads=1, protected=lambda k: False)
    yield wb
    wb.close()
