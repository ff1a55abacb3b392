"""The hot tier on a real CUDA device (skipped without one; run by scripts/gpu_check.sh on a GPU machine)."""

from __future__ import annotations

import pytest
import torch

from kvtier.tiering import BlockLayout, Namespace, StoreConfig, TieredStore

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

LAYOUT = BlockLayout("float16", 30, 3, 64, 16)
NS = Namespace("gpu", "smollm2", "test", LAYOUT)


def _blocks(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(LAYOUT.shape(), generator=g).to(torch.float16) for _ in range(n)]


def _cfg(tmp_path, **kw) -> StoreConfig:
    base = dict(data_dir=str(tmp_path / "d"), hot_device="auto", hot_capacity=LAYOUT.block_bytes() * 4,
                warm_capacity=LAYOUT.block_bytes() * 8, cold_capacity=1 << 28)
    base.update(kw)
    return StoreConfig(**base)


def test_auto_device_picks_cuda_and_warm_is_pinned(tmp_path):
    with TieredStore(_cfg(tmp_path)) as store:
        assert store.tier_names() == ["hot", "warm", "cold"]
        assert store.memory[0].device.type == "cuda"
        assert store.memory[1].pin_memory


def test_put_lands_on_gpu_demotes_to_pinned_host_and_round_trips(tmp_path):
    blocks = _blocks(10)
    tokens = list(range(16 * 10))
    with TieredStore(_cfg(tmp_path)) as store:
        res = store.put(NS, tokens, blocks, session_id="s", durable=True)
        tiers = store.lookup(NS, tokens).tiers
        assert tiers.count("hot") == 4 and tiers.count("warm") == 6
        for key in res.keys[-4:]:
            block, tier = store.get(key, promote=False)
            assert tier == "hot" and block.data.is_cuda
        warm_block = store.memory[1].peek(res.keys[0])
        assert warm_block.data.is_pinned()
        for i, (key, block, tier) in enumerate(store.iter_blocks(res.keys)):
            assert torch.equal(block.data.cpu(), blocks[i].reshape(-1).view(torch.uint8))
        assert store.check() == []


def test_restart_prefetches_cold_blocks_to_gpu(tmp_path):
    blocks = _blocks(4, seed=1)
    tokens = list(range(64))
    with TieredStore(_cfg(tmp_path)) as store:
        store.put(NS, tokens, blocks, session_id="s", durable=True)
    with TieredStore(_cfg(tmp_path)) as store:
        session, before, handle = store.resume("gpu", "s")
        assert before == ["cold"] * 4
        assert handle.future.result(timeout=60) == 4
        assert store.lookup(NS, tokens).tiers == ["hot"] * 4
        for i, (key, block, tier) in enumerate(store.iter_blocks(session.keys)):
            assert tier == "hot" and block.data.is_cuda
            assert torch.equal(block.data.cpu(), blocks[i].reshape(-1).view(torch.uint8))
