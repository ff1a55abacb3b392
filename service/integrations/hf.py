"""Hugging Face transformers helpers: turn a ``DynamicCache`` into kvtier blocks and back, and name its namespace.

May import torch, transformers (the ``hf`` extra), the client types and local client, and tiering; never the apps.
The bridge between a causal LM's attention cache and kvtier's block format
``[2, layers, kv_heads, tokens, head_dim]``. :func:`save_cache` and :func:`restore_cache` work with
any kvtier client: :class:`kvtier.service.client.client.KVTierClient` (gRPC),
:class:`kvtier.service.client.local.LocalKVTierClient`, or a bare :class:`kvtier.tiering.store.TieredStore`
(wrapped on the fly). Typical turn of a chat server::

    cache, cached = restore_cache(client, "conv-42", ids, namespace=namespace)  # cached < len(ids), always
    out = model.generate(torch.tensor([ids]), cache=cache or DynamicCache(), ...)  # transformers 5: `cache`
    save_cache(client, namespace, "conv-42", out_ids, cache_after)   # sends only the new blocks

A namespace names the model *and its weights* (:func:`~kvtier.service.integrations.fingerprint.model_fingerprint`),
so a new revision never reuses old blocks; a rank of a sharded model adds its :class:`Shard`. Model loading,
chat templates and greedy decoding for the demo, bench and tests live in :mod:`kvtier.service.apps.model`.
The model and caches live on the caller's device; blocks travel on CPU.

A restore writes the blocks straight into the cache's final K/V tensors: the client's ``get_kv`` scatters
them into one layer-major tensor ``[2, layers, kv_heads, capacity, head_dim]`` (over shared memory, the
server writes into the client's arena), each checked there, and every layer of the ``DynamicCache`` is a
:class:`~kvtier.service.integrations.presized.PresizedLayer` over its slices: no concatenation, no second
copy, and room past the restored tokens so the model's next forward appends without copying the cache
(transformers' own ``DynamicLayer`` copies the whole layer on every append). Layers of other kinds
(sliding windows) get their tokens through their own ``update`` (a copy).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kvtier.service.client.types import DTYPE_NAMES, TORCH_DTYPES, KVTierClientError, LookupInfo, PutInfo, ResumeInfo
from kvtier.service.client.local import LocalKVTierClient
from kvtier.service.integrations.fingerprint import ModelFingerprint, model_fingerprint
from kvtier.service.integrations.presized import PresizedLayer
from kvtier.service.wire.convert import DEFAULT_TENANT
from kvtier.tiering.keys import BlockKey, Namespace, Shard, chain_keys
from kvtier.tiering.layout import BlockLayout, blocks_for
from kvtier.tiering.store import TieredStore

log = logging.getLogger(__name__)


def layout_for(model, block_tokens: int = 16, dtype: str | torch.dtype | None = None, *,
               shard: Shard | None = None) -> BlockLayout:
    """The kvtier block layout of ``model``'s attention cache (of one rank's heads with ``shard``).

    :param dtype: element type of stored blocks (default: the model's dtype). Storing below the
        model's precision saves space but the restored cache is then no longer token-exact.
    :param shard: the rank's shard: the layout holds ``len(shard.heads)`` KV heads.
    """
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = len(shard.heads) if shard is not None else getattr(cfg, "num_key_value_heads", None) or heads
    dtype = dtype or model.dtype
    name = DTYPE_NAMES[dtype] if isinstance(dtype, torch.dtype) else dtype
    return BlockLayout(name, cfg.num_hidden_layers, kv_heads, head_dim, block_tokens)


def namespace_for(model, *, block_tokens: int = 16, dtype: str | torch.dtype | None = None,
                  tenant: str = DEFAULT_TENANT, fingerprint: ModelFingerprint | None = None,
                  revision: str | None = None, shard: Shard | None = None) -> Namespace:
    """The namespace of ``model``'s caches: fingerprint + :func:`layout_for` (+ the rank's ``shard``).

    ``tenant`` defaults to the server's default tenant, so keys agree with a server that does not
    authenticate and with a local store.

    :param fingerprint: use this instead of deriving one (default: ``model_fingerprint(model, revision=revision)``).
    :param revision: the caller's revision of the weights, for models whose weights cannot be traced.
    :param shard: for one rank of a sharded model: which heads its caches hold (its keys differ from
        every other rank's).
    :raises ValueError: when no fingerprint can be derived (pass ``revision=``).
    """
    fp = fingerprint or model_fingerprint(model, revision=revision)
    return Namespace(tenant, fp.model, fp.revision, layout_for(model, block_tokens, dtype, shard=shard), shard)


def cache_length(cache) -> int:
    """Tokens a ``DynamicCache`` covers."""
    return int(cache.get_seq_length())


def crop_cache(cache, tokens: int) -> None:
    """Shorten ``cache`` in place to its first ``tokens`` tokens (no-op when it is not longer)."""
    extra = cache_length(cache) - tokens
    if extra > 0:
        cache.crop(-extra)


def cache_to_blocks(cache, layout: BlockLayout, start_token: int = 0, end_token: int | None = None, *,
                    out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Blocks of tokens ``[start_token, end_token)`` of a batch-1 cache, one tensor per block.

    :param start_token: a multiple of ``layout.block_tokens``.
    :param end_token: default: the cache's length. Every block is full except possibly the last.
    :param out: write the blocks into these tensors (one per block, of the layout's dtype and block
        shapes, e.g. a client's :meth:`~kvtier.service.client.client.KVTierClient.block_buffers`, which
        a Put then sends without copying them again) and return them.
    :returns: contiguous tensors ``[2, layers, kv_heads, t, head_dim]`` in the layout's dtype, on the
        cache's device (or ``out``).
    :raises ValueError: on a range outside the cache, an unaligned start, a batch other than 1, a
        cache whose geometry does not match ``layout``, or ``out`` tensors that do not match the blocks.
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
    starts = range(start_token, end, bt)
    shapes = [layout.shape(min(s + bt, end) - s) for s in starts]
    if out is not None and (len(out) != len(shapes) or any(
            tuple(o.shape) != shape or o.dtype != dtype or not o.is_contiguous() for o, shape in zip(out, shapes))):
        raise ValueError(f"out= must be {len(shapes)} contiguous {dtype} tensors of shapes {shapes}")
    keys, values = [layer.keys[0] for layer in layers], [layer.values[0] for layer in layers]
    blocks = []
    for b, s in enumerate(starts):
        e = min(s + bt, end)
        dst = out[b] if out is not None and out[b].device == k0.device else torch.empty(shapes[b], dtype=dtype,
                                                                                         device=k0.device)
        if k0.dtype == dtype:  # one stack per half-block (~2x faster than a copy per layer for SmolLM2)
            torch.stack([k[:, s:e] for k in keys], out=dst[0])
            torch.stack([v[:, s:e] for v in values], out=dst[1])
        else:
            for i in range(len(layers)):
                dst[0, i].copy_(keys[i][:, s:e])
                dst[1, i].copy_(values[i][:, s:e])
        if out is not None and dst is not out[b]:  # another device: one copy of the whole block
            dst = out[b].copy_(dst)
        blocks.append(dst)
    return blocks


#: Tokens of room a restored cache gets past the prompt for generated tokens (see :func:`restore_cache`).
GENERATION_ROOM = 128


def kv_to_cache(kv: torch.Tensor, tokens: int, *, config=None) -> DynamicCache:
    """A ``DynamicCache`` over the first ``tokens`` tokens of ``kv`` (``[2, layers, kv_heads, capacity,
    head_dim]``, batch 1) without copying them: each plain layer is a :class:`PresizedLayer` whose K and V
    are views of ``kv[0, i]`` and ``kv[1, i]``, the rest of the capacity its room. Layers of other kinds
    (sliding windows, with ``config``) get a copy of the tokens through their own ``update``.

    :param config: the model config, for models whose cache layers differ (sliding windows).
    """
    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    for i in range(kv.shape[1]):
        k, v = kv[0, i].unsqueeze(0), kv[1, i].unsqueeze(0)
        if i < len(cache.layers) and type(cache.layers[i]) is not DynamicLayer:
            cache.update(k[:, :, :tokens], v[:, :, :tokens], i)  # sliding-window and other layers keep their rules
            continue
        layer = PresizedLayer(k, v, tokens)
        if i < len(cache.layers):
            cache.layers[i] = layer
        else:
            cache.layers.append(layer)
    return cache


def blocks_to_cache(blocks: Sequence[torch.Tensor], *, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, config=None, room: int = 0) -> DynamicCache:
    """A ``DynamicCache`` holding the blocks' tokens in order (the inverse of :func:`cache_to_blocks`):
    each block is copied once into the layer-major tensor the cache's layers view (:func:`kv_to_cache`).

    :param dtype: dtype of the cache (default: the blocks'); :param device: its device (default: the blocks').
    :param config: the model config, for models whose cache layers differ (sliding windows).
    :param room: tokens the layers can take past the blocks' before an append copies them.
    :raises ValueError: if there are no blocks.
    """
    if not blocks:
        raise ValueError("no blocks to build a cache from")
    first = blocks[0]
    total = sum(int(b.shape[3]) for b in blocks)
    kv = torch.empty((*first.shape[:3], total + room, first.shape[4]), dtype=dtype or first.dtype,
                     device=device or first.device)
    pos = 0
    for b in blocks:
        kv[:, :, :, pos:pos + b.shape[3]].copy_(b)
        pos += b.shape[3]
    return kv_to_cache(kv, total, config=config)


def _as_client(client):
    return LocalKVTierClient(client) if isinstance(client, TieredStore) else client


def save_cache(client, namespace: Namespace, session_id: str | None, token_ids: Sequence[int], cache, *,
               durable: bool = False) -> PutInfo:
    """Park the cache of ``token_ids`` under ``session_id``, sending only blocks not cached yet.

    The blocks cover ``token_ids[:n]`` where ``n = min(len(token_ids), cache length)`` (after
    ``generate`` the cache lacks the last token). A lookup finds the cached prefix; only blocks from
    the first missing one are converted and sent, and the session records the whole chain. The blocks
    are converted straight into the client's :meth:`block_buffers` (over shared memory: its arena),
    so the layout conversion is the only copy on this side.

    :param client: a kvtier client, a :class:`LocalKVTierClient`, or a :class:`TieredStore`.
    :param durable: return once blocks and session are on disk (survive SIGKILL).
    :raises kvtier.service.client.types.KVTierClientError: if the store refuses the put.
    """
    client = _as_client(client)
    ids = [int(t) for t in token_ids]
    n = min(len(ids), cache_length(cache))
    ids = ids[:n]
    found = client.lookup(namespace, ids)
    first = found.cached_blocks
    start = first * namespace.layout.block_tokens
    blocks = []
    if start < n:  # produced straight into the client's buffers: over shared memory, the Put copies them no more
        blocks = cache_to_blocks(cache, namespace.layout, start, n,
                                 out=client.block_buffers(namespace, n, first_block=first))
    put = client.put(namespace, ids, blocks, first_block=first, session_id=session_id, durable=durable)
    log.debug("saved %d tokens: %d blocks were cached, %d sent", n, first, len(blocks))
    return put


def _session_prefix(ns: Namespace, info: ResumeInfo, ids: list[int]) -> tuple[list[BlockKey], int]:
    """Keys of the session's blocks that ``ids`` starts with, and the tokens they cover (may exceed ``len(ids)``
    by less than a block when the last matching block is longer than the prompt)."""
    bt = ns.layout.block_tokens
    cached = info.keys[:info.cached_blocks]
    common = 0
    for a, b in zip(chain_keys(ns, ids), cached):
        if a != b:
            break
        common += 1
    last = len(info.keys) - 1
    tail = info.tokens - last * bt  # tokens of the session's last block
    if common == last and len(cached) == len(info.keys) and 0 < tail < bt and len(ids) > info.tokens \
            and chain_keys(ns, ids[:info.tokens])[-1] == info.keys[-1]:
        return list(info.keys), info.tokens  # the prompt extends the session through its partial block
    return list(cached[:common]), min(common * bt, len(ids))


def restore_cache(client, target: Namespace | str, token_ids: Sequence[int], *, namespace: Namespace | None = None,
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None, config=None,
                  accept_lossy: bool = False, room: int | None = None) -> tuple[DynamicCache | None, int]:
    """The longest cached prefix of ``token_ids`` as a ``DynamicCache``, and how many tokens it covers.

    The cache never covers all of ``token_ids`` (at most ``len(token_ids) - 1``), so ``generate``
    always has a token left to compute (pass it as ``model.generate(..., cache=cache)``). Blocks are
    matched by their chained keys, so a prompt that differs from the cached one at token t reuses only
    the blocks before t's block. With a session target, the session's last block is reused even when
    partial: when the prompt extends the session, the key of the prompt's tokens over the partial
    block's length is compared with the partial block's key (a namespace target reuses full blocks
    and an identical partial block only: its length is not known).

    The blocks are written straight into the cache's K/V tensors (the client's ``get_kv``; module
    docstring), verified there; the layers view them (:func:`kv_to_cache`) with ``room`` tokens to grow
    into before an append copies. With ``dtype`` or ``device`` other than the layout's dtype on the host
    (a CUDA model), the restored tokens are then copied once into a tensor of that dtype on that device,
    with the same room: blocks always land in host memory first (the shared-memory arena, or the Get
    stream's bytes), never straight in device memory.

    :param target: the namespace to look the tokens up in, or a session id whose chain is reused
        (its blocks are compared with ``token_ids``' keys under the session's namespace).
    :param namespace: with a session id, the namespace the caller expects (model, revision, layout):
        a session of another namespace gives a miss. With a namespace target, ignored.
    :param dtype, device, config: as for :func:`blocks_to_cache`.
    :param accept_lossy: also reuse approximate blocks (a lossy namespace's blocks read back from the
        server's cold tier); by default the restored prefix ends before the first of them.
    :param room: tokens the cache takes past the restored prefix without copying (default: the rest of
        ``token_ids`` plus :data:`GENERATION_ROOM`).
    :returns: ``(None, 0)`` on a miss.
    :returns: ``(None, 0)`` also for a session that does not exist (yet): a new conversation is a miss.
    :raises kvtier.service.client.types.KVTierClientError: on transport errors, ``DATA_LOSS`` for a block
        failing its checksum (no cache is returned), ``INVALID_ARGUMENT`` for blocks whose dtype or shape
        disagree with the namespace's layout.
    """
    client = _as_client(client)
    ids = [int(t) for t in token_ids]
    limit = len(ids) - 1
    if limit <= 0:
        return None, 0
    if isinstance(target, Namespace):
        ns = target
        found: LookupInfo = client.lookup(ns, ids, accept_lossy=accept_lossy)
        keys, cached_tokens = found.keys[:found.cached_blocks], found.cached_tokens
    else:
        try:
            info = client.resume(target, tenant=namespace.tenant if namespace is not None else None,
                                 accept_lossy=accept_lossy)
        except KVTierClientError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise
            log.debug("session %r not found: nothing to restore", target)
            return None, 0
        ns = info.namespace
        if namespace is not None and namespace != ns:
            log.info("session %r belongs to namespace %s/%s/%s, not the expected one: not reused", target,
                     ns.model, ns.revision, ns.layout.describe())
            return None, 0
        keys, cached_tokens = _session_prefix(ns, info, ids)
    use = min(cached_tokens, limit)
    bt = ns.layout.block_tokens
    need = blocks_for(use, bt)
    if not need:
        return None, 0
    room = len(ids) - use + GENERATION_ROOM if room is None else max(room, 0)
    # acts for the namespace's tenant; the last block may reach past `use`: its tail lies in the room
    got = client.get_kv(keys[:need], namespace=ns, capacity=max(need * bt, use + room), accept_lossy=accept_lossy)
    use = min(use, got.tokens)
    if not use:
        return None, 0
    kv = got.kv
    if (dtype is not None and dtype != kv.dtype) or (device is not None and torch.device(device) != kv.device):
        moved = torch.empty(kv.shape, dtype=dtype or kv.dtype, device=device or kv.device)
        moved[:, :, :, :use].copy_(kv[:, :, :, :use])
        kv = moved
    return kv_to_cache(kv, use, config=config), use
