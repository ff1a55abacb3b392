"""End to end on SmolLM2-135M: a chat's KV cache parked in kvtier comes back token-exact.

One conversation (system + user turn, ~130 tokens, 16 greedy tokens) is saved; its second turn is
generated from a full recompute, from the cache that never left memory, and from the cache restored
from warm, from cold after a restart, and after a SIGKILL following a durable save: every variant
yields the same tokens, and restored K/V are bit-identical to what was saved. A session whose last block
is partial is resumed through that block. Changing an earlier turn or the model revision must not produce
a false hit. fp32 on CPU, one model load per session.
"""

from __future__ import annotations

import copy
import signal

import pytest
import torch

from kvtier.service.apps import model as lm
from kvtier.service.integrations import hf
from kvtier.service.integrations.fingerprint import model_fingerprint
from kvtier.service.client.client import KVTierClient
from tests.fixtures.server import KVTierProcess
from kvtier.tiering import Namespace, StoreConfig, TieredStore

pytestmark = pytest.mark.model

NEW_TOKENS = 16
SYSTEM = ("You are a patient physics tutor. Answer in plain language, avoid formulas unless asked, keep every answer "
          "short, and end with one question that checks the student's understanding of the idea you explained.")
TURN1 = ("I am preparing for an exam about waves and light. Explain why the sky looks blue during the day but red "
         "and orange at sunset, and mention what role the thickness of the atmosphere plays in both cases. "
         "Please also tell me whether the same effect happens on Mars, where the air is much thinner and full "
         "of fine red dust.")
TURN2 = "Thanks. Now explain the same idea to a ten-year-old in two sentences."


class Conversation:
    """The first turn, generated once, and the second turn's prompt and reference answer."""

    def __init__(self, model, tok) -> None:
        self.model, self.tok = model, tok
        self.ns = hf.namespace_for(model)
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURN1}]
        self.ids1 = lm.chat_ids(tok, msgs)
        first = self.generate(self.ids1)
        self.full1 = self.ids1 + first.tokens
        self.cache1 = first.cache  # never leaves memory; only ever deep-copied
        self.saved = hf.cache_to_blocks(self.cache1, self.ns.layout)
        msgs += [{"role": "assistant", "content": tok.decode(first.tokens, skip_special_tokens=True)},
                 {"role": "user", "content": TURN2}]
        self.ids2 = lm.chat_ids(tok, msgs)
        self.reference = self.generate(self.ids2).tokens

    def generate(self, ids, cache=None, max_new_tokens: int = NEW_TOKENS) -> lm.Generation:
        return lm.greedy_generate(self.model, ids, cache, max_new_tokens=max_new_tokens, eos_token_id=self.tok.eos_token_id)

    def in_memory(self, tokens: int):
        cache = copy.deepcopy(self.cache1)
        hf.crop_cache(cache, tokens)
        return cache

    def check_restored(self, cache, tokens: int, *, vs_memory: bool = False) -> None:
        """Restored K/V equal the saved bits, and generating from them gives the reference tokens
        (with ``vs_memory``, so does the never-saved cache cropped to the same length)."""
        bt = self.ns.layout.block_tokens
        assert cache is not None and 0 < tokens < len(self.ids2) and tokens == hf.cache_length(cache)
        assert tokens >= (len(self.ids1) // bt) * bt, "the first turn's full blocks must be reused"
        expected = torch.cat(self.saved, dim=3)[:, :, :, :tokens]
        got = torch.cat(hf.cache_to_blocks(cache, self.ns.layout), dim=3)
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
        assert self.generate(self.ids2, cache).tokens == self.reference
        if vs_memory:
            assert self.generate(self.ids2, self.in_memory(tokens)).tokens == self.reference


@pytest.fixture(scope="module")
def conv(smollm2) -> Conversation:
    return Conversation(*smollm2)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = KVTierProcess(tmp_path_factory.mktemp("smollm2-srv"),
                         extra_env={"KVTIER_STORE__HOT_DEVICE": "off", "KVTIER_STORE__WARM_CAPACITY": "256MiB"})
    yield proc.start()
    proc.kill()


def _client(server) -> KVTierClient:
    kv = KVTierClient(server.target, timeout=60)
    kv.wait_ready(30)
    return kv


def test_prompt_sizes_are_modest(conv):
    assert 100 <= len(conv.ids1) <= 300 and len(conv.ids2) <= 300 and conv.ids2[:len(conv.ids1)] == conv.ids1


def test_restore_from_warm_then_cold_after_restart(conv, server):
    with _client(server) as kv:
        put = hf.save_cache(kv, conv.ns, "chat", conv.full1, conv.cache1)
        assert len(put.stored) == len(conv.saved)
        again = hf.save_cache(kv, conv.ns, "chat", conv.full1, conv.cache1)  # everything cached: nothing sent
        assert not again.stored and not again.skipped_present
        assert set(kv.lookup(conv.ns, conv.ids2).tiers) == {"warm"}
        cache, tokens = hf.restore_cache(kv, conv.ns, conv.ids2)
        conv.check_restored(cache, tokens, vs_memory=True)
        # model.generate computes only the uncached tail and agrees with the manual greedy loop
        cache, _ = hf.restore_cache(kv, conv.ns, conv.ids2)
        out = conv.model.generate(torch.tensor([conv.ids2]), cache=cache, max_new_tokens=NEW_TOKENS,
                                  do_sample=False, eos_token_id=conv.tok.eos_token_id,
                                  pad_token_id=conv.tok.eos_token_id)
        assert out[0, len(conv.ids2):].tolist() == conv.reference
    assert server.restart(signal.SIGTERM) == 0
    with _client(server) as kv:
        found = kv.lookup(conv.ns, conv.ids2)
        assert found.cached_blocks and set(found.tiers) == {"cold"}
        cache, tokens = hf.restore_cache(kv, "chat", conv.ids2, namespace=conv.ns)  # by session id
        conv.check_restored(cache, tokens)


def test_durable_save_survives_sigkill(conv, server):
    with _client(server) as kv:
        hf.save_cache(kv, conv.ns, "chat-durable", conv.full1, conv.cache1, durable=True)
    server.restart(signal.SIGKILL)
    with _client(server) as kv:
        assert kv.resume("chat-durable").tokens == len(conv.full1) - 1
        cache, tokens = hf.restore_cache(kv, "chat-durable", conv.ids2, namespace=conv.ns)
        conv.check_restored(cache, tokens)


def test_session_resumes_through_its_partial_last_block(conv, server):
    """A session of m tokens (m not a multiple of the block size) that the next prompt extends gives back all
    m tokens, not the m // 16 * 16 of its full blocks; generating from them is token-exact."""
    bt = conv.ns.layout.block_tokens
    m = len(conv.ids1) + 5  # a few tokens into the assistant's answer, inside a block
    m += 0 if m % bt else 1
    assert m % bt and m < len(conv.ids2) - 1 and conv.ids2[:len(conv.ids1)] == conv.ids1
    saved = conv.generate(conv.ids2[:m], max_new_tokens=1).cache  # covers exactly ids2[:m]
    assert hf.cache_length(saved) == m
    with _client(server) as kv:
        hf.save_cache(kv, conv.ns, "chat-partial", conv.ids2[:m], saved)
        cache, tokens = hf.restore_cache(kv, "chat-partial", conv.ids2, namespace=conv.ns)
        assert tokens == m
        assert torch.equal(torch.cat(hf.cache_to_blocks(cache, conv.ns.layout), dim=3).view(torch.int32),
                           torch.cat(hf.cache_to_blocks(saved, conv.ns.layout), dim=3).view(torch.int32))
        assert conv.generate(conv.ids2, cache).tokens == conv.reference
        assert hf.restore_cache(kv, conv.ns, conv.ids2)[1] % bt == 0  # a namespace lookup reuses full blocks only


def test_changed_earlier_turn_is_no_false_hit(conv, server):
    with _client(server) as kv:
        hf.save_cache(kv, conv.ns, "chat", conv.full1, conv.cache1)
        bt = conv.ns.layout.block_tokens
        changed = list(conv.ids2)
        at = len(conv.ids1) // 2  # a token inside the first user turn
        changed[at] = changed[at] + 1
        found = kv.lookup(conv.ns, changed)
        assert found.cached_blocks == at // bt and found.cached_tokens == (at // bt) * bt
        cache, tokens = hf.restore_cache(kv, conv.ns, changed)
        assert tokens == (at // bt) * bt <= at
        assert torch.equal(torch.cat(hf.cache_to_blocks(cache, conv.ns.layout), dim=3),
                           torch.cat(conv.saved, dim=3)[:, :, :, :tokens])
        assert conv.generate(changed, cache).tokens == conv.generate(changed).tokens


def test_changed_model_revision_gives_zero_blocks(conv, server, tmp_path):
    other = Namespace(conv.ns.tenant, conv.ns.model, conv.ns.revision + "-retrained", conv.ns.layout)
    with _client(server) as kv:
        hf.save_cache(kv, conv.ns, "chat", conv.full1, conv.cache1)
        assert kv.lookup(other, conv.ids2).cached_blocks == 0
        assert hf.restore_cache(kv, other, conv.ids2) == (None, 0)
        assert hf.restore_cache(kv, "chat", conv.ids2, namespace=other) == (None, 0)
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"weights v1")
    b.write_bytes(b"weights v2")
    fa, fb = model_fingerprint(weights_path=str(a)), model_fingerprint(weights_path=str(b))
    assert fa.revision != fb.revision and fa == model_fingerprint(weights_path=str(a))
    assert model_fingerprint(conv.model).model == lm.SMOLLM2_ID  # the loader recorded its GGUF file
    assert conv.ns.revision == model_fingerprint(conv.model).revision != fa.revision


def test_engine_without_grpc_cold_only(conv, tmp_path):
    """hf helpers on a bare TieredStore with no memory tier: every restored block comes from disk."""
    cfg = StoreConfig(data_dir=str(tmp_path / "store"), hot_device="off", warm_capacity=0, durable_sync=False)
    with TieredStore(cfg) as store:
        hf.save_cache(store, conv.ns, "chat", conv.full1, conv.cache1, durable=True)
        found = store.lookup(conv.ns, conv.ids2)
        assert found.blocks and set(found.tiers) == {"cold"}
        cache, tokens = hf.restore_cache(store, conv.ns, conv.ids2)
        conv.check_restored(cache, tokens)
