"""Scenario 3, codec: what the cold tier's record codec does to real KV bytes.

The KV of one SmolLM2 conversation (2048 tokens in full mode, 512 in quick) is cut into the store's
16-token blocks, cast to each dtype (fp16, bf16, fp32) and encoded with :class:`tiering.codec.Codec`
at each zstd level, by each lossless codec (blosc2's shuffle+zstd, the byte-shuffle then zstd, zstd
alone). Per combination: the ratio raw/record (header included: what lands on disk), the fraction
record/raw, and compress/decompress GB/s over all blocks (checksums included, as in the store).
Every record is decoded back and compared byte for byte.
"""

from __future__ import annotations

import time

import torch

from kvtier.service.integrations.hf import cache_to_blocks, layout_for
from kvtier.tiering.codec import Codec, CodecId
from kvtier.tiering.config import StoreConfig
from kvtier.tiering.dtypes import TORCH_DTYPES as DTYPES

from kvtier.service.apps.bench.context import BenchContext
from kvtier.service.apps.bench.model import get_model, kv_sample

CODECS = {"blosc2_zstd": CodecId.BLOSC2_ZSTD, "shuffle_zstd": CodecId.SHUFFLE_ZSTD, "zstd": CodecId.ZSTD}


def _measure(codec: Codec, blocks: list[tuple[memoryview, tuple]], dtype: str) -> dict:
    codec.encode(blocks[0][0], dtype, blocks[0][1])  # warm the per-thread contexts
    t0 = time.perf_counter()
    records = [codec.encode(raw, dtype, shape) for raw, shape in blocks]
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    decoded = [codec.decode(rec)[1] for rec in records]
    t_dec = time.perf_counter() - t0
    raw_bytes = sum(len(raw) for raw, _ in blocks)
    rec_bytes = sum(len(r) for r in records)
    lossless = all(d.tobytes() == bytes(raw) for d, (raw, _) in zip(decoded, blocks))
    return {"raw_bytes": raw_bytes, "record_bytes": rec_bytes, "ratio": raw_bytes / rec_bytes,
            "disk_fraction": rec_bytes / raw_bytes, "compress_gbps": raw_bytes / t_enc / 1e9,
            "decompress_gbps": raw_bytes / t_dec / 1e9, "lossless": int(lossless)}


def run(ctx: BenchContext) -> dict:
    """Rows ``{dtype, codec, level, ratio, disk_fraction, compress_gbps, decompress_gbps, lossless}``."""
    tokens = 64 if ctx.tiny else 512 if ctx.quick else 2048
    levels = [3] if ctx.quick else [1, 3, 9]
    bm = get_model(ctx)
    cache = kv_sample(ctx, tokens)
    layout = layout_for(bm.model, 16, "float32")
    base = cache_to_blocks(cache, layout)
    rows = []
    for dname, dt in DTYPES.items():
        blocks = []
        for b in base:
            t = b.to(dt).contiguous()
            blocks.append((memoryview(t.reshape(-1).view(torch.uint8).numpy()), tuple(t.shape)))
        for cname, cid in CODECS.items():
            for level in levels:
                ctx.step(f"{dname} {cname} level {level}")
                rows.append({"dtype": dname, "codec": cname, "level": level, "blocks": len(blocks),
                             **_measure(Codec(level, cid), blocks, dname)})
    default = StoreConfig()
    return {"rows": rows, "notes": [f"KV of {tokens} tokens of {bm.name} in {len(base)} blocks of 16 tokens; "
                                    f"store default: {default.codec} level {default.zstd_level}"],
            "tokens": tokens, "default_codec": default.codec, "default_level": default.zstd_level}
