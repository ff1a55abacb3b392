"""The model whose KV the resume and codec scenarios use: SmolLM2-135M, or a toy Llama in tiny mode.

Loaded once per run (``ctx.shared``): SmolLM2 takes ~25 s to dequantise from its GGUF. The toy model
(2 layers, random weights, seeded) has the same architecture and cache format, so tiny runs walk the
same code in a second. Conversations are seeded random token ids: the timings depend on the length,
not on the words, and the same ids are used for recompute and for every restore.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvtier.service.apps.model import load_smollm2
from kvtier.service.integrations.fingerprint import ModelFingerprint, model_fingerprint

from kvtier.service.apps.bench.context import BenchContext


@dataclass
class BenchModel:
    """A causal LM ready for ``kvtier.service.integrations.hf``: the model, its fingerprint and a short name."""

    model: object
    fingerprint: ModelFingerprint
    name: str

    @property
    def vocab(self) -> int:
        return int(self.model.config.vocab_size)


def _toy_model() -> BenchModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).eval()
    return BenchModel(model, ModelFingerprint("kvtier-bench/toy-llama", "seed0"), "toy-llama (random, tiny mode)")


def get_model(ctx: BenchContext) -> BenchModel:
    """The run's model (loaded on first use): SmolLM2-135M-Instruct fp32 on CPU, or the toy in tiny mode.

    :raises FileNotFoundError: if SmolLM2's weights are not installed (not in tiny mode).
    """
    if "model" not in ctx.shared:
        if ctx.tiny:
            ctx.shared["model"] = _toy_model()
        else:
            ctx.step("loading SmolLM2-135M (~25 s)")
            model, _tok = load_smollm2()
            ctx.shared["model"] = BenchModel(model, model_fingerprint(model), "SmolLM2-135M-Instruct")
    return ctx.shared["model"]


def conversation(bm: BenchModel, tokens: int, seed: int = 0) -> list[int]:
    """``tokens`` seeded random token ids (avoiding the first 16 ids, where special tokens live)."""
    rng = np.random.default_rng(seed + tokens)
    return [int(t) for t in rng.integers(16, bm.vocab, size=tokens)]


@torch.inference_mode()
def prefill(bm: BenchModel, token_ids: list[int]):
    """The ``DynamicCache`` of ``token_ids`` and the greedy next token after them."""
    out = bm.model(input_ids=torch.tensor([token_ids]), use_cache=True)
    return out.past_key_values, int(out.logits[0, -1].argmax())


def kv_sample(ctx: BenchContext, tokens: int):
    """A cache of ``tokens`` tokens of the run's model (computed once per length, kept in ``ctx.shared``)."""
    key = f"kv{tokens}"
    if key not in ctx.shared:
        bm = get_model(ctx)
        ctx.step(f"prefill of {tokens} tokens for a KV sample")
        ctx.shared[key] = prefill(bm, conversation(bm, tokens))[0]
    return ctx.shared[key]
