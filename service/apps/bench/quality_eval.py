"""What the quality scenario measures on a model: lossy round trips of a cache, greedy agreement, KL, NLL.

Imports torch, ``kvtier.service.integrations.hf`` and ``kvtier.tiering`` (lossy codecs, record header size).
Every function takes the model and blocks explicitly; nothing here knows about the bench's modes.

A *restore* is what a resumed conversation gets from a lossy cold tier: each ``[2, L, H, t, D]`` block
of the history, in the KV dtype under test, is encoded and decoded by the codec, and the blocks are
rebuilt into an fp32 ``DynamicCache``. The exact baseline is the same blocks without the codec (what a
lossless tier returns), so for bf16 KV both sides share the bf16 rounding and only the codec differs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from transformers import DynamicCache

from kvtier.service.apps.model import chat_ids
from kvtier.service.integrations.hf import cache_to_blocks, layout_for
from kvtier.tiering.codec import HEADER, Codec, CodecId

DATA = Path(__file__).resolve().parent / "data"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BLOCK_TOKENS = 16


def load_chats() -> list[list[dict]]:
    """The shipped multi-turn chats (``data/quality_prompts.json``), each a list of ``{role, content}``."""
    return json.loads((DATA / "quality_prompts.json").read_text())["chats"]


def load_heldout() -> list[str]:
    """The shipped held-out paragraphs (``data/heldout.txt``, blank-line separated)."""
    return [p.strip() for p in (DATA / "heldout.txt").read_text().split("\n\n") if p.strip()]


def chat_split(tokenizer, chat: list[dict]) -> tuple[list[int], int]:
    """``(ids of the whole chat with the generation prompt, tokens of its history)``: the history is
    every turn but the last user one, as a resumed conversation would have cached it."""
    full = chat_ids(tokenizer, chat, add_generation_prompt=True)
    hist = chat_ids(tokenizer, chat[:-1], add_generation_prompt=False)
    common = next((i for i, (a, b) in enumerate(zip(full, hist)) if a != b), min(len(full), len(hist)))
    return full, max(1, min(common, len(full) - 1))


@dataclass
class CodecTally:
    """Bytes of one codec over many blocks (sums)."""

    raw_bytes: int = 0
    payload_bytes: int = 0
    blocks: int = 0

    @property
    def disk_bytes(self) -> int:
        """Payload plus one record header per block: what the cold tier would write."""
        return self.payload_bytes + HEADER.size * self.blocks


@dataclass
class Tallies:
    """Per (dtype, codec): bytes of the round trips and the quality samples of the scenario."""

    codec: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)

    def bytes_for(self, dtype: str, name: str) -> CodecTally:
        return self.codec.setdefault((dtype, name), CodecTally())

    def add(self, dtype: str, name: str, **values: float) -> None:
        q = self.quality.setdefault((dtype, name), {})
        for k, v in values.items():
            q.setdefault(k, []).append(v)


def exact_blocks(model, cache, dtype: str) -> list[torch.Tensor]:
    """A prefilled fp32 cache as the store's 16-token blocks in ``dtype`` (the exact bytes)."""
    return cache_to_blocks(cache, layout_for(model, BLOCK_TOKENS, dtype))


def _raw(block: torch.Tensor) -> np.ndarray:
    return block.contiguous().view(-1).view(torch.uint8).numpy()


def _decode(codec, payload, dtype: str, shape, out: np.ndarray | None = None) -> np.ndarray:
    if isinstance(codec, Codec):
        return codec.decode(payload, out)[1]
    return codec.decode(payload, dtype, shape, out)


def round_trip(blocks: list[torch.Tensor], dtype: str, codec, tally: CodecTally | None = None) -> list[torch.Tensor]:
    """Each block through ``codec`` (a lossy codec, or the lossless record :class:`Codec`), counted in
    ``tally``; returns the decoded blocks in ``dtype``."""
    out = []
    for b in blocks:
        raw, shape = _raw(b), tuple(b.shape)
        payload = codec.encode(raw, dtype, shape)
        data = _decode(codec, payload, dtype, shape)
        if tally is not None:
            tally.raw_bytes += raw.size
            tally.payload_bytes += len(payload) - (HEADER.size if isinstance(codec, Codec) else 0)
            tally.blocks += 1
        out.append(torch.from_numpy(np.asarray(data)).view(TORCH_DTYPES[dtype]).view(shape))
    return out


def codec_speed(blocks: list[torch.Tensor], dtype: str, codec, passes: int) -> tuple[float, float]:
    """``(encode GB/s, decode GB/s)`` of raw bytes over ``blocks``, best of ``passes`` passes each (one
    thread; decode writes into preallocated buffers, as the store's copy-out does)."""
    raws, shapes = [_raw(b) for b in blocks], [tuple(b.shape) for b in blocks]
    outs = [np.empty_like(r) for r in raws]
    total = sum(r.size for r in raws)
    enc = dec = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        payloads = [codec.encode(r, dtype, s) for r, s in zip(raws, shapes)]
        t1 = time.perf_counter()
        for p, s, o in zip(payloads, shapes, outs):
            _decode(codec, p, dtype, s, o)
        t2 = time.perf_counter()
        enc, dec = min(enc, t1 - t0), min(dec, t2 - t1)
    return total / enc / 1e9, total / dec / 1e9


def lossless_codec() -> Codec:
    """The store's default lossless record codec (byte-shuffle + zstd level 3): the bytes baseline."""
    return Codec(3, CodecId.SHUFFLE_ZSTD)


def batch_cache(model, variants: list[list[torch.Tensor]]):
    """One fp32 ``DynamicCache`` whose batch row ``i`` holds ``variants[i]`` (blocks of the same tokens):
    every restore of one history decodes side by side, so each generation step is one forward."""
    kv = torch.stack([torch.cat(list(blocks), dim=3).float() for blocks in variants])  # [B, 2, L, H, T, D]
    cache = DynamicCache(config=model.config)
    for i in range(kv.shape[2]):
        cache.update(kv[:, 0, i], kv[:, 1, i], i)
    return cache


@torch.inference_mode()
def greedy_rows(model, ids: list[int], variants: list[list[torch.Tensor]], new_tokens: int) -> list[list[int]]:
    """Greedy continuation of ``ids`` over each restored history (the variants hold its first ``h``
    tokens; ``ids[h:]`` is prefilled over them): one token list per variant, decoded as one batch."""
    h = sum(b.shape[3] for b in variants[0])
    cache = batch_cache(model, variants)
    step = torch.tensor([ids[h:]] * len(variants))
    out = []
    for _ in range(new_tokens):
        nxt = model(input_ids=step, cache=cache, use_cache=True).logits[:, -1].argmax(-1)
        out.append(nxt)
        step = nxt[:, None]
    return torch.stack(out, dim=1).tolist()


@torch.inference_mode()
def tail_log_probs(model, seqs: list[list[int]], variants: list[list[torch.Tensor]], last: int) -> torch.Tensor:
    """Log-probabilities ``[B, last, vocab]`` predicting the last ``last`` tokens of each ``seqs[i]`` (all of
    one length) over restored history ``variants[i]`` (its first ``h`` tokens): one teacher-forced
    forward of ``seq[h:-1]`` per row."""
    h = sum(b.shape[3] for b in variants[0])
    step = torch.tensor([seq[h:-1] for seq in seqs])
    logits = model(input_ids=step, cache=batch_cache(model, variants), use_cache=True).logits[:, -last:]
    return torch.log_softmax(logits.float(), dim=-1)


def agreement(exact: list[int], lossy: list[int]) -> tuple[float, int]:
    """``(fraction of positions with the same token, index of the first different one or len)``."""
    same = [a == b for a, b in zip(exact, lossy)]
    first = next((i for i, s in enumerate(same) if not s), len(same))
    return sum(same) / max(len(same), 1), first


def kl_mean(ref: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over positions of KL(ref ‖ other) of next-token distributions given as log-probabilities
    ``[positions, vocab]``."""
    return float((ref.exp() * (ref - other)).sum(dim=-1).clamp_min(0).mean())


def nll_sum(log_probs: torch.Tensor, targets: list[int]) -> float:
    """Summed negative log-likelihood of ``targets`` under ``log_probs`` ``[len(targets), vocab]``."""
    return float(-log_probs[torch.arange(len(targets)), torch.tensor(targets)].sum())
