"""Lossy cold codecs in the store: a lossy namespace's blocks are exact in memory, approximate (and marked
``lossy``) once they come back from the cold tier; exact-only reads treat them as misses; exact and lossy
namespaces of one model never share a key; a damaged lossy record is a miss."""

from __future__ import annotations

import os

import lmdb
import numpy as np
import pytest
from tiering_helpers import cold_of

from kvtier.tiering import BlockLayout, Namespace
from kvtier.tiering.codec import HEADER, Codec, CodecId
from kvtier.tiering.errors import InvalidBlock
from kvtier.tiering.keys import chain_keys
from kvtier.tiering.lossy import FLOAT_DTYPES, by_id
from kvtier.tiering.lossy_spec import CODEC_IDS, LOSSY_DTYPES
from kvtier.tiering.sessions import namespace_from_dict, namespace_to_dict

LAYOUT = BlockLayout("float32", layers=2, kv_heads=2, head_dim=16, block_tokens=8)
EXACT = Namespace("t", "m", "r", LAYOUT)
LOSSY = Namespace("t", "m", "r", LAYOUT, cold_codec="fp8_e4m3")
TOKENS = list(range(3 * LAYOUT.block_tokens))


def _blocks(seed: int = 0, n: int = 3) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(LAYOUT.block_bytes() // 4).astype(np.float32).tobytes() for _ in range(n)]


def _codec_byte(store, key) -> int:
    """The codec-id byte of ``key``'s cold record."""
    return cold_of(store).get_record(key)[5]


@pytest.fixture
def cold_lossy(make_store):
    """A store reopened over 3 durable blocks of ``LOSSY`` (memory empty, cold holds lossy records);
    returns the store, the keys and the exact bytes put."""
    raw = _blocks()
    s = make_store(hot_capacity=1 << 20, warm_capacity=1 << 20)
    keys = s.put(LOSSY, TOKENS, raw, durable=True).keys
    got = s.get(keys[0])  # memory keeps the exact bytes while it has them
    assert got is not None and not got[0].lossy and bytes(got[0].data.numpy()) == raw[0]
    s.close()
    return make_store(hot_capacity=1 << 20, warm_capacity=1 << 20), keys, raw


def test_exact_namespace_keys_are_unchanged_and_lossy_ones_differ():
    assert EXACT.cold_codec == "" and not EXACT.lossy
    assert chain_keys(EXACT, TOKENS) == chain_keys(Namespace("t", "m", "r", LAYOUT), TOKENS)
    lossy = {codec: chain_keys(Namespace("t", "m", "r", LAYOUT, cold_codec=codec), TOKENS)
             for codec in ("fp8_e4m3", "int8", "int4", "int4/g8")}
    all_keys = [k for ks in lossy.values() for k in ks] + chain_keys(EXACT, TOKENS)
    assert len(set(all_keys)) == len(all_keys)


@pytest.mark.parametrize("bad", ["fp16", "int4/g0", "int4/g65536", "int4/g032", "int4/g", "fp8_e4m3/g32", "INT4"])
def test_unknown_cold_codec_is_refused(bad):
    with pytest.raises(InvalidBlock) as err:
        Namespace("t", "m", "r", LAYOUT, cold_codec=bad)
    assert err.value.field == "namespace.cold_codec"


def test_the_light_names_agree_with_the_codecs():
    assert set(LOSSY_DTYPES) == set(FLOAT_DTYPES)
    assert {i: by_id(i).name for i in CODEC_IDS} == CODEC_IDS


def test_lossy_codec_needs_float_kv():
    with pytest.raises(InvalidBlock, match="float"):
        Namespace("t", "m", "r", BlockLayout("int8", 1, 1, 4, 4), cold_codec="int8")


def test_namespace_json_keeps_cold_codec_only_when_lossy():
    assert "cold_codec" not in namespace_to_dict(EXACT)
    assert namespace_to_dict(LOSSY)["cold_codec"] == "fp8_e4m3"
    assert namespace_from_dict(namespace_to_dict(LOSSY)) == LOSSY
    assert namespace_from_dict(namespace_to_dict(EXACT)) == EXACT


def test_cold_record_is_lossy_and_reads_back_marked_lossy(cold_lossy):
    s, keys, raw = cold_lossy
    assert _codec_byte(s, keys[0]) == 16
    block, tier = s.get(keys[0])
    assert tier == "cold" and block.lossy and block.cold_codec == "fp8_e4m3"
    got = np.frombuffer(bytes(block.data.numpy()), np.float32)
    want = np.frombuffer(raw[0], np.float32)
    assert not np.array_equal(got, want) and np.allclose(got, want, atol=0.2, rtol=0.1)
    promoted, where = s.get(keys[0])  # promoted: still lossy in the memory tier
    assert where != "cold" and promoted.lossy


def test_exact_only_copy_out_is_a_miss_and_accepting_it_a_lossy_hit(cold_lossy):
    s, keys, _raw = cold_lossy
    region = np.zeros(8 << 20, np.uint8)
    refused = s.copy_out(keys, region, exact_only=True)
    assert refused.items == [] and refused.stop == "miss" and not region.any()
    got = s.copy_out(keys, region, exact_only=False)
    assert len(got.items) == 3 and all(block.lossy for _k, block, _t, _o in got.items)


def test_lookup_marks_lossy_blocks_and_exact_only_stops_before_them(cold_lossy):
    s, keys, _raw = cold_lossy
    every = s.lookup(LOSSY, TOKENS)
    assert every.blocks == 3 and every.lossy == [True] * 3
    assert s.lookup(LOSSY, TOKENS, exact_only=True).blocks == 0


def test_exact_and_lossy_namespaces_of_one_model_coexist(make_store, data_dir):
    raw = _blocks(1)
    s = make_store(hot_capacity=1 << 20, warm_capacity=1 << 20)
    exact_keys = s.put(EXACT, TOKENS, raw, durable=True).keys
    lossy_keys = s.put(LOSSY, TOKENS, raw, durable=True).keys
    assert not set(exact_keys) & set(lossy_keys)
    s.close()
    s = make_store(hot_capacity=1 << 20, warm_capacity=1 << 20)
    assert _codec_byte(s, exact_keys[0]) == CodecId.BLOSC2_ZSTD and _codec_byte(s, lossy_keys[0]) == 16
    exact = s.copy_out(exact_keys, np.zeros(8 << 20, np.uint8), exact_only=True)
    assert [b.lossy for _k, b, _t, _o in exact.items] == [False] * 3
    assert [bytes(s.get(k)[0].data.numpy()) for k in exact_keys] == raw
    assert s.lookup(EXACT, TOKENS, exact_only=True).blocks == 3
    assert s.lookup(LOSSY, TOKENS, exact_only=True).blocks == 0


def test_damaged_lossy_record_is_a_miss(make_store, data_dir):
    s = make_store(hot_capacity=1 << 20, warm_capacity=1 << 20)
    keys = s.put(LOSSY, TOKENS, _blocks(2), durable=True).keys
    s.close()
    env = lmdb.open(os.path.join(data_dir, "cold"), max_dbs=8, subdir=True)
    with env.begin(write=True, db=env.open_db(b"blocks", create=False)) as txn:
        rec = bytearray(txn.get(keys[1].digest))
        rec[(HEADER.size + len(rec)) // 2] ^= 0xA5  # inside the plain fp8 codes: only the checksum sees it
        txn.put(keys[1].digest, bytes(rec))
    env.close()
    s = make_store(hot_capacity=1 << 20, warm_capacity=1 << 20)
    assert s.get(keys[1]) is None
    assert cold_of(s).checksum_failures == 1
    got = s.copy_out(keys, np.zeros(8 << 20, np.uint8))
    assert len(got.items) == 1 and got.stop == "miss"


def test_non_finite_block_is_stored_exactly():
    codec = Codec()
    values = np.ones(LAYOUT.block_bytes() // 4, np.float32)
    values[3] = np.inf
    record = codec.encode(values.tobytes(), "float32", LAYOUT.shape(8), lossy="int4")
    header, raw = codec.decode(record)
    assert not header.lossy and bytes(raw) == values.tobytes()
    good = codec.encode(np.ones_like(values).tobytes(), "float32", LAYOUT.shape(8), lossy="int4/g4")
    assert Codec.read_header(good).lossy and Codec.read_header(good).codec == 18
