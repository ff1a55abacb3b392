"""Sharded models: two tensor-parallel "ranks" park different KV heads of the same tokens and each gets its own back.

Every rank sees the same tokens under the same model, so only the namespace's shard keeps their blocks
apart; the caches go through a real server. The wire checks a shard against the layout at the door.
"""

from __future__ import annotations

import grpc
import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvtier.service.client.client import KVTierClient
from kvtier.service.integrations import hf
from kvtier.service.integrations.fingerprint import ModelFingerprint
from kvtier.service.wire import convert
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.tiering.errors import InvalidBlock
from kvtier.tiering.keys import Shard, chain_keys
from tests.fixtures.wire import details, stub

TOKENS = list(range(3, 43))
WORLD = 2
FP = ModelFingerprint("acme/tp-llama", "r1")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def rank_cache(full: DynamicCache, heads: tuple[int, ...]) -> DynamicCache:
    """What a rank holding ``heads`` has: its heads' slice of every layer."""
    out = DynamicCache()
    for i, layer in enumerate(full.layers):
        out.update(layer.keys[:, list(heads)].contiguous(), layer.values[:, list(heads)].contiguous(), i)
    return out


def _save_ranks(model, kv, prefix: str):
    """Each rank parks its heads of TOKENS under its own session; returns (shards, namespaces, caches)."""
    with torch.inference_mode():
        full = model(input_ids=torch.tensor([TOKENS]), use_cache=True).cache
    shards = [Shard(r, WORLD, (2 * r, 2 * r + 1)) for r in range(WORLD)]
    fp = ModelFingerprint(FP.model, f"{FP.revision}-{prefix}")  # blocks of its own on the shared server
    namespaces = [hf.namespace_for(model, fingerprint=fp, shard=s) for s in shards]
    caches = [rank_cache(full, s.heads) for s in shards]
    for r, ns in enumerate(namespaces):
        put = hf.save_cache(kv, ns, f"{prefix}{r}", TOKENS, caches[r])
        assert len(put.stored) == 3 and not put.skipped_present  # rank 1 does not collide with rank 0
    return shards, namespaces, caches


def _same(cache, mine, n: int) -> bool:
    return all(torch.equal(a.keys, b.keys[:, :, :n]) and torch.equal(a.values, b.values[:, :, :n])
               for a, b in zip(cache.layers, mine.layers))


def test_two_ranks_store_their_own_heads_of_the_same_tokens(model, shared_server):
    with KVTierClient(shared_server.target, timeout=30) as kv:
        kv.wait_ready(30)
        shards, namespaces, caches = _save_ranks(model, kv, "tp-rank")
        assert [ns.layout.kv_heads for ns in namespaces] == [2, 2]
        assert not set(chain_keys(namespaces[0], TOKENS)) & set(chain_keys(namespaces[1], TOKENS))
        for r, ns in enumerate(namespaces):
            cache, n = hf.restore_cache(kv, ns, TOKENS + [1])
            assert n == 32 and _same(cache, caches[r], n)  # its own heads, not the other rank's
            assert kv.resume(f"tp-rank{r}").keys == chain_keys(ns, TOKENS)
        unsharded = hf.namespace_for(model, fingerprint=FP)
        assert kv.lookup(unsharded, TOKENS).cached_blocks == 0


def test_a_sharded_session_resumes_with_its_shard(model, shared_server):
    with KVTierClient(shared_server.target, timeout=30) as kv:
        kv.wait_ready(30)
        shards, namespaces, caches = _save_ranks(model, kv, "tp-session")
        for r, ns in enumerate(namespaces):
            assert kv.resume(f"tp-session{r}").namespace.shard == shards[r]
            cache, n = hf.restore_cache(kv, f"tp-session{r}", TOKENS + [1], namespace=ns)
            assert n == len(TOKENS) and _same(cache, caches[r], n)  # the session's partial block too


def test_shard_converts_both_ways_and_is_checked_against_the_layout(model):
    ns = hf.namespace_for(model, fingerprint=FP, shard=Shard(1, 2, (2, 3)))
    msg = convert.namespace_to_proto(ns)
    assert list(msg.shard.heads) == [2, 3] and msg.shard.rank == 1 and msg.shard.world_size == 2
    assert convert.namespace_from_proto(msg) == ns
    assert not convert.namespace_to_proto(hf.namespace_for(model, fingerprint=FP)).HasField("shard")
    cases = {"header.namespace.shard.heads": pb.Shard(rank=0, world_size=2, heads=[0, 1, 2]),
             "header.namespace.shard.rank": pb.Shard(rank=2, world_size=2, heads=[0, 1])}
    for field, bad in cases.items():
        msg.shard.CopyFrom(bad)
        with pytest.raises(InvalidBlock) as err:
            convert.namespace_from_proto(msg, "header.namespace")
        assert err.value.field == field
    msg.shard.CopyFrom(pb.Shard(rank=0, world_size=2, heads=[1, 1]))
    with pytest.raises(InvalidBlock, match="distinct"):
        convert.namespace_from_proto(msg)


def test_a_bad_shard_is_invalid_argument_on_the_wire(model, shared_server):
    msg = convert.namespace_to_proto(hf.namespace_for(model, fingerprint=FP, shard=Shard(0, 2, (0, 1))))
    msg.shard.heads.append(2)
    channel, kv = stub(shared_server.target)
    with channel, pytest.raises(grpc.RpcError) as err:
        kv.Lookup(pb.LookupRequest(namespace=msg, token_ids=TOKENS), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = [v.field for d in details(err.value) for v in getattr(d, "field_violations", [])]
    assert fields == ["namespace.shard.heads"]
