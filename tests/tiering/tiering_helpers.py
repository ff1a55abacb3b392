"""Tiny helpers shared by the engine's tests (imported as ``tiering_helpers``; fixtures are in conftest).

Blocks are tiny (64 bytes: float16, 1 layer, 1 head, head_dim 4, 4 tokens per block) so that
capacities read as "room for N blocks" and scenarios can be narrated block by block.
"""

from __future__ import annotations

from kvtier.tiering import BlockLayout, Namespace, StoreConfig

LAYOUT = BlockLayout("float16", layers=1, kv_heads=1, head_dim=4, block_tokens=4)
BLOCK = LAYOUT.block_bytes()  # 64 bytes
NS = Namespace("t", "m", "r", LAYOUT)


def tokens_for(seq: int, blocks: int = 1) -> list[int]:
    """Token ids of a ``blocks``-block sequence that no other ``seq`` shares (so keys differ)."""
    return [seq * 1000 + j for j in range(blocks * LAYOUT.block_tokens)]


def payload(seq: int, index: int = 0, tokens: int | None = None) -> bytes:
    """Deterministic, distinguishable bytes for block ``index`` of sequence ``seq``."""
    n = LAYOUT.block_bytes(tokens)
    head = f"{seq}:{index}|".encode()
    return (head * (n // len(head) + 1))[:n]


def config(data_dir: str, **kw) -> StoreConfig:
    """A small test config: CPU hot tier, tiny capacities, fast sweeps. ``kw`` overrides."""
    base = dict(data_dir=data_dir, hot_device="cpu", hot_capacity=4 * BLOCK, warm_capacity=8 * BLOCK,
                warm_pin="off", cold_capacity=4 << 20, durable_sync=False, lease_s=0.2, maintenance_s=0.05,
                compress_threads=1, prefetch_threads=2, writer_batch=8)
    base.update(kw)
    return StoreConfig(**base)


def cold_of(store):
    """The cold tier under ``store``'s durable (write-behind) tier, or ``None`` when cold is off."""
    durable = store.tiers.durable
    return None if durable is None else durable.cold
