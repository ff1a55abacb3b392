"""tiering/keys.py: the chained BLAKE2b key scheme, pinned by test vectors (also in the README)."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest

from kvtier.tiering import BlockKey, BlockLayout, InvalidBlock, Namespace, chain_keys
from kvtier.tiering.keys import Shard, iter_keys

LAYOUT = BlockLayout("float16", layers=30, kv_heads=3, head_dim=64, block_tokens=16)
NS = Namespace("acme", "HuggingFaceTB/SmolLM2-135M-Instruct", "main", LAYOUT)

#: tokens 0..39 under NS: two full blocks and a partial one of 8 tokens.
ROOT = "a2a76262c247cd13181401bb27c7745c"
VECTORS = ["399bcce2e8846288e4e9922a0307685a",
           "dda10968fbf57d9b2b5162fff6c12e0e",
           "2f3b71bfb8234081bc4a0f82be94294c"]
#: tokens 0..47: the third block is now full and gets its own key from the same parent.
FULL_THIRD = "1b1ee78f3d12a54e4b3e549622752379"


#: rank 1 of 3 holding KV head 1, one head per block: layout float16:30x1x64/16, shard text "shard:1/3:1".
SHARD_NS = Namespace("acme", "HuggingFaceTB/SmolLM2-135M-Instruct", "main", BlockLayout("float16", 30, 1, 64, 16),
                     Shard(1, 3, (1,)))
SHARD_ROOT = "91a1d47f2bc944bf1d6f68c70ff9adf9"
SHARD_VECTORS = ["554b3d7f1584daa994857819fe117837",
                 "c76806754a34ba12bd673ae8dfaf23c2",
                 "104a070c9559aa50e81d4319d5131490"]
#: the same namespace without its shard.
UNSHARDED_ROOT = "9b449e738a462b72a8df661ac1f95440"

#: NS with the lossy cold codec fp8_e4m3: one more field, "codec:fp8_e4m3", after the layout.
LOSSY_NS = Namespace(NS.tenant, NS.model, NS.revision, LAYOUT, cold_codec="fp8_e4m3")
LOSSY_ROOT = "86d1a9630435aefbf7a8a992909d37f5"
LOSSY_VECTORS = ["095143b98f3578ea548b93affd5b14bd",
                 "3b5e2a36a01a8b49a52c15f1ad4e3aa5",
                 "258350d347651dffbb306967d31bbb2c"]


def _spec_keys(tenant: str, model: str, revision: str, layout: str, tokens: list[int], bt: int,
               shard: str | None = None, codec: str | None = None) -> list[str]:
    """The spec of the keys.py docstring, written out again with hashlib only."""
    def field(s: str) -> bytes:
        raw = s.encode("utf-8")
        return struct.pack("<I", len(raw)) + raw

    def h(x: bytes) -> bytes:
        return hashlib.blake2b(x, digest_size=16).digest()

    parent = h(b"kvtier-ns-v1" + field(tenant) + field(model) + field(revision) + field(layout)
               + (field(shard) if shard is not None else b"") + (field("codec:" + codec) if codec else b""))
    out = []
    for start in range(0, len(tokens), bt):
        parent = h(parent + b"".join(struct.pack("<I", t) for t in tokens[start:start + bt]))
        out.append(parent.hex())
    return out


def test_vectors_are_pinned():
    assert LAYOUT.describe() == "float16:30x3x64/16"
    assert NS.root().hex() == ROOT
    assert [k.hex() for k in chain_keys(NS, list(range(40)))] == VECTORS


def test_vectors_match_the_written_spec():
    spec = _spec_keys("acme", "HuggingFaceTB/SmolLM2-135M-Instruct", "main", "float16:30x3x64/16",
                      list(range(40)), 16)
    assert spec == VECTORS
    assert _spec_keys("acme", "HuggingFaceTB/SmolLM2-135M-Instruct", "main", "float16:30x3x64/16",
                      list(range(48)), 16)[2] == FULL_THIRD


def test_shard_vectors_are_pinned_and_match_the_written_spec():
    assert SHARD_NS.shard.describe() == "shard:1/3:1"
    assert SHARD_NS.root().hex() == SHARD_ROOT
    assert [k.hex() for k in chain_keys(SHARD_NS, list(range(40)))] == SHARD_VECTORS
    assert _spec_keys("acme", "HuggingFaceTB/SmolLM2-135M-Instruct", "main", "float16:30x1x64/16", list(range(40)),
                      16, "shard:1/3:1") == SHARD_VECTORS
    unsharded = Namespace(SHARD_NS.tenant, SHARD_NS.model, SHARD_NS.revision, SHARD_NS.layout)
    assert unsharded.root().hex() == UNSHARDED_ROOT != SHARD_ROOT
    assert Namespace(NS.tenant, NS.model, NS.revision, NS.layout, None).root().hex() == ROOT


def test_lossy_vectors_are_pinned_and_match_the_written_spec():
    assert LOSSY_NS.root().hex() == LOSSY_ROOT != ROOT
    assert [k.hex() for k in chain_keys(LOSSY_NS, list(range(40)))] == LOSSY_VECTORS
    assert _spec_keys("acme", "HuggingFaceTB/SmolLM2-135M-Instruct", "main", "float16:30x3x64/16",
                      list(range(40)), 16, codec="fp8_e4m3") == LOSSY_VECTORS
    assert Namespace(NS.tenant, NS.model, NS.revision, LAYOUT, cold_codec="").root().hex() == ROOT


@pytest.mark.parametrize("shard", [Shard(0, 3, (1,)), Shard(1, 2, (1,)), Shard(1, 3, (0,))])
def test_any_shard_change_changes_every_key(shard):
    other = Namespace(SHARD_NS.tenant, SHARD_NS.model, SHARD_NS.revision, SHARD_NS.layout, shard)
    assert not set(chain_keys(other, list(range(40)))) & set(chain_keys(SHARD_NS, list(range(40))))


def test_partial_block_does_not_poison_the_full_one():
    grown = chain_keys(NS, list(range(48)))
    assert [k.hex() for k in grown[:2]] == VECTORS[:2]
    assert grown[2].hex() == FULL_THIRD != VECTORS[2]
    longer = chain_keys(NS, list(range(64)))
    assert longer[:3] == grown  # the block after a once-partial block chains from the full key


@pytest.mark.parametrize("change", [
    dict(tenant="other"), dict(model="HuggingFaceTB/SmolLM2-360M-Instruct"), dict(revision="v2"),
    dict(layout=BlockLayout("bfloat16", 30, 3, 64, 16)), dict(layout=BlockLayout("float16", 30, 3, 64, 8)),
    dict(layout=BlockLayout("float16", 29, 3, 64, 16)),
])
def test_any_namespace_change_changes_every_key(change):
    fields = dict(tenant=NS.tenant, model=NS.model, revision=NS.revision, layout=NS.layout) | change
    other = chain_keys(Namespace(**fields), list(range(40)))
    assert not set(other) & set(chain_keys(NS, list(range(40))))


def test_field_encoding_is_length_prefixed():
    # Without the length prefix ("ab","c") and ("a","bc") would collide.
    a = Namespace("ab", "c", "r", LAYOUT)
    b = Namespace("a", "bc", "r", LAYOUT)
    assert a.root() != b.root()


def test_token_inputs_agree():
    toks = list(range(40))
    assert chain_keys(NS, np.array(toks, dtype=np.int64)) == chain_keys(NS, toks)
    assert chain_keys(NS, np.array(toks, dtype=np.uint32)) == chain_keys(NS, toks)
    assert list(iter_keys(NS, toks)) == chain_keys(NS, toks)
    assert chain_keys(NS, []) == []
    assert len(chain_keys(NS, [2**32 - 1] * 17)) == 2


@pytest.mark.parametrize("bad", [[-1], [2**32], [[1, 2]], [1.5]])
def test_bad_tokens_raise(bad):
    with pytest.raises(InvalidBlock):
        chain_keys(NS, bad)


def test_namespace_validation():
    with pytest.raises(InvalidBlock):
        Namespace("t", "", "r", LAYOUT)
    with pytest.raises(InvalidBlock):
        Namespace("t" * 257, "m", "r", LAYOUT)
    Namespace("t" * 256, "m", "r", LAYOUT)


def test_block_key_is_a_value_type():
    k = chain_keys(NS, [1])[0]
    assert BlockKey(bytes(k.digest)) == k and hash(BlockKey(bytes(k.digest))) == hash(k)
    assert BlockKey.from_hex(k.hex()) == k
    with pytest.raises(AttributeError):
        k.digest = b"x" * 16  # frozen
    with pytest.raises(InvalidBlock):
        BlockKey(b"short")
    with pytest.raises(InvalidBlock):
        BlockKey.from_hex("zz")
    assert repr(k).startswith("BlockKey(")
