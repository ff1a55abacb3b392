"""tiering/scatter.py and TieredStore.scatter_out: blocks written layer-major into a KV destination at
their token offsets, bit-identical to concatenating them, each checked on the destination's bytes; a
damaged block stops the answer ("damaged"), a block of another geometry is INVALID_ARGUMENT-shaped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xxhash
from test_corruption import _flip
from tiering_helpers import cold_of

from kvtier.tiering.errors import InvalidBlock
from kvtier.tiering.keys import Namespace
from kvtier.tiering.layout import BlockLayout
from kvtier.tiering.scatter import KVDest

LAY = BlockLayout("float16", layers=3, kv_heads=2, head_dim=4, block_tokens=4)
NS3 = Namespace("t", "m", "r", LAY)
CAP = dict(hot_capacity=8 * LAY.block_bytes(), warm_capacity=16 * LAY.block_bytes())


def _blocks(seed: int, tokens: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    whole = torch.randn(LAY.shape(tokens), generator=gen).to(torch.float16)
    return [whole[:, :, :, s:s + LAY.block_tokens].contiguous() for s in range(0, tokens, LAY.block_tokens)]


def _dest(capacity: int, first: int = 0, dtype=torch.float16, lay: BlockLayout = LAY) -> tuple[torch.Tensor, KVDest]:
    kv = torch.full((2, lay.layers, lay.kv_heads, capacity, lay.head_dim), -7.0, dtype=dtype)
    return kv, KVDest(kv.view(torch.uint8).numpy(), "float16" if dtype == torch.float16 else "float32", first)


@pytest.mark.parametrize("tokens", [1, 4, 7, 13])
def test_place_is_concatenation_and_its_checksum_the_blocks(tokens):
    blocks = _blocks(tokens, tokens)
    kv, dest = _dest(tokens + 5, first=2)
    pos = 2
    for b in blocks:
        assert dest.place(pos, b.numpy(), b.shape[3]) == xxhash.xxh3_64_intdigest(b.numpy())
        pos += b.shape[3]
    assert torch.equal(kv[:, :, :, 2:2 + tokens], torch.cat(blocks, dim=3))
    assert (kv[:, :, :, :2] == -7).all() and (kv[:, :, :, 2 + tokens:] == -7).all()  # nothing else written


def test_a_byte_changed_in_the_destination_changes_its_checksum():
    (b,) = _blocks(1, 4)
    kv, dest = _dest(8)
    good = dest.place(0, b.numpy(), 4)
    dest.array[1, 2, 1, 3, 5] ^= 1  # V, last layer, last head, last token
    assert dest.checksum_at(0, 4) != good


def test_destinations_refuse_what_they_cannot_hold():
    with pytest.raises(ValueError):
        KVDest(np.zeros((2, 1, 1, 4, 8), dtype=np.float32), "float32")  # not bytes
    with pytest.raises(ValueError):
        KVDest(np.zeros((2, 1, 1, 4, 6), dtype=np.uint8), "float32")  # rows not whole elements
    kv, dest = _dest(4)
    with pytest.raises(ValueError):
        dest.place(2, _blocks(1, 4)[0].numpy(), 4)  # past the capacity


@pytest.mark.parametrize("source", ["memory", "cold"])
@pytest.mark.parametrize("tokens", [8, 11])
def test_scatter_out_from_every_tier_is_bit_identical_to_concatenation(make_store, source, tokens):
    s = make_store(**CAP)
    blocks = _blocks(tokens, tokens)
    ids = list(range(100, 100 + tokens))
    keys = s.put(NS3, ids, blocks, durable=True).keys
    if source == "cold":
        s.close()
        s = make_store(**CAP)
        assert {s.where(k) for k in keys} == {"cold"}
    kv, dest = _dest(tokens + 3)
    out = s.scatter_out(keys, dest)
    assert out.stop == "" and [off for _, _, _, off in out.items] == list(range(0, tokens, LAY.block_tokens))
    assert {t for _, _, t, _ in out.items} == ({"cold"} if source == "cold" else {"hot", "warm"} & {
        t for _, _, t, _ in out.items})
    assert torch.equal(kv[:, :, :, :tokens], torch.cat(blocks, dim=3))
    if source == "cold":  # promoted from its own buffer, not from the caller's destination
        kv.zero_()
        assert [s.where(k) for k in keys] == ["hot"] * len(keys)
        assert torch.equal(torch.cat([s.get(k)[0].data.view(torch.float16).reshape(b.shape)
                                      for k, b in zip(keys, blocks)], 3), torch.cat(blocks, 3))


def test_it_stops_at_the_capacity_and_says_how_big_the_next_block_is(make_store):
    s = make_store(**CAP)
    keys = s.put(NS3, list(range(12)), _blocks(3, 12)).keys
    _, dest = _dest(9, first=1)
    out = s.scatter_out(keys, dest)
    assert len(out.items) == 2 and (out.stop, out.next_bytes) == ("region", LAY.block_bytes())


def test_a_block_damaged_in_memory_is_damaged_and_never_reported(make_store):
    s = make_store(**CAP)
    keys = s.put(NS3, list(range(12)), _blocks(4, 12)).keys
    tier = next(t for t in s.tiers.fast if t.contains(keys[1]))
    tier.get(keys[1]).data[7] ^= 1  # a bit flipped in the warm/hot copy
    _, dest = _dest(12)
    out = s.scatter_out(keys, dest)
    assert out.stop == "damaged" and [k for k, _, _, _ in out.items] == keys[:1]


def test_a_damaged_cold_record_is_damaged(make_store, data_dir):
    s = make_store(**CAP)
    keys = s.put(NS3, list(range(12)), _blocks(5, 12), durable=True).keys
    s.close()
    _flip(data_dir, keys[1], lambda n: n - 2)
    s = make_store(**CAP)
    _, dest = _dest(12)
    out = s.scatter_out(keys, dest)
    assert out.stop == "damaged" and [k for k, _, _, _ in out.items] == keys[:1]
    assert not cold_of(s).contains(keys[1])


@pytest.mark.parametrize("other", [BlockLayout("float16", 2, 3, 4, 4), BlockLayout("float16", 3, 2, 2, 8)])
def test_a_destination_of_another_geometry_is_refused(make_store, other):
    s = make_store(**CAP)
    keys = s.put(NS3, list(range(8)), _blocks(6, 8)).keys
    _, dest = _dest(8, lay=other)
    with pytest.raises(InvalidBlock) as err:
        s.scatter_out(keys, dest)
    assert err.value.field == "destination"
