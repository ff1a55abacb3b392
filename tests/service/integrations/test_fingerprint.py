"""kvtier.service.integrations.fingerprint: a namespace's revision comes from the weights actually loaded.

Tiny random-init Llama models (2 layers) saved with ``save_pretrained`` stand in for two revisions of a
user's model under one name; their caches go through a real server, so a shared namespace would show
as a cross hit.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvtier.service.client.client import KVTierClient
from kvtier.service.integrations import hf
from kvtier.service.integrations.fingerprint import model_fingerprint, record_weights

TOKENS = list(range(3, 43))  # 40 tokens: two full blocks and a partial one


def tiny_llama(seed: int, **config) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **config)
    return LlamaForCausalLM(cfg).eval()


def saved(seed: int, folder) -> LlamaForCausalLM:
    """A model of ``seed``'s weights saved to ``folder`` (overwriting it) and loaded back from it."""
    tiny_llama(seed).save_pretrained(folder)
    return LlamaForCausalLM.from_pretrained(folder).eval()


@torch.inference_mode()
def prefill(model, ids):
    return model(input_ids=torch.tensor([ids]), use_cache=True).cache


def test_two_revisions_under_one_name_never_share_keys(tmp_path, server):
    folder = tmp_path / "my-llama"
    v1 = saved(1, folder)
    ns1 = hf.namespace_for(v1)
    v2 = saved(2, folder)  # retrained: same name, new weights
    ns2 = hf.namespace_for(v2)
    assert ns1.model == ns2.model == str(folder)
    assert ns1.revision != ns2.revision and ns1.root() != ns2.root()
    assert hf.namespace_for(LlamaForCausalLM.from_pretrained(folder)) == ns2  # same weights reloaded
    with KVTierClient(server.target, timeout=30) as kv:
        kv.wait_ready(30)
        hf.save_cache(kv, ns1, "v1", TOKENS, prefill(v1, TOKENS))
        assert kv.lookup(ns2, TOKENS).cached_blocks == 0
        assert hf.restore_cache(kv, ns2, TOKENS + [5]) == (None, 0)
        assert hf.restore_cache(kv, "v1", TOKENS + [5], namespace=ns2) == (None, 0)
        cache, n = hf.restore_cache(kv, ns1, TOKENS + [5])
        assert n == 32 and torch.equal(cache.layers[0].keys, prefill(v1, TOKENS).layers[0].keys[:, :, :32])


def test_a_folder_config_with_fresh_weights_is_not_the_folder_model(tmp_path):
    folder = tmp_path / "m"
    loaded = saved(1, folder)
    fresh = LlamaForCausalLM(LlamaForCausalLM.from_pretrained(folder).config)  # names the folder, other weights
    assert fresh.name_or_path == loaded.name_or_path
    fp_loaded, fp_fresh = model_fingerprint(loaded), model_fingerprint(fresh)
    assert fp_loaded.revision.startswith("files:") and fp_fresh.revision.startswith("state:")
    assert fp_loaded.revision != fp_fresh.revision


def test_in_memory_models_hash_their_state_dict():
    a, b = tiny_llama(7), tiny_llama(7)
    b.config.name_or_path = a.config.name_or_path = "in-memory"
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight[0, 0] += 1
    assert model_fingerprint(a).revision != model_fingerprint(b).revision


def test_kv_config_changes_the_revision(tmp_path):
    folder = tmp_path / "m"
    fp32 = saved(1, folder)
    bf16 = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert model_fingerprint(fp32).revision != model_fingerprint(bf16).revision
    a, b = tiny_llama(3), tiny_llama(3, rope_theta=500000.0)
    assert model_fingerprint(a, revision="r1") != model_fingerprint(b, revision="r1")
    assert model_fingerprint(a, revision="r1").revision.startswith("r1+kv:")


def test_recorded_weights_file_is_hashed_and_nothing_else_is_borrowed(tmp_path):
    model = tiny_llama(1)
    weights = tmp_path / "w.gguf"
    weights.write_bytes(b"quantised weights v1")
    record_weights(model, str(weights), model_id="acme/llama")
    first = model_fingerprint(model)
    assert first.model == "acme/llama" and first.revision.startswith("file:")
    weights.write_bytes(b"quantised weights v2")
    assert model_fingerprint(model).revision != first.revision


def test_nothing_to_derive_asks_for_a_revision():
    with torch.device("meta"):
        ghost = tiny_llama(1)
    ghost.config.name_or_path = "ghost"
    with pytest.raises(ValueError, match="revision="):
        model_fingerprint(ghost)
    assert model_fingerprint(ghost, revision="v7").revision.startswith("v7+kv:")
    with pytest.raises(ValueError, match="revision="):
        model_fingerprint()
