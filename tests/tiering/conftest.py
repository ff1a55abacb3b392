"""Fixtures of the engine's tests: stores on a temporary data dir (helpers: ``tiering_helpers``)."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterator

import pytest
from tiering_helpers import config

from kvtier.tiering import TieredStore


@pytest.fixture
def make_store(data_dir: str) -> Iterator[Callable[..., TieredStore]]:
    """Factory of stores on ``data_dir`` (same dir each call: close one before opening the next)."""
    opened: list[TieredStore] = []

    def make(**kw) -> TieredStore:
        store = TieredStore(config(kw.pop("data_dir", data_dir), **kw))
        opened.append(store)
        return store

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def tmp_dir(tmp_path: pathlib.Path) -> str:
    return os.fspath(tmp_path)
