"""Scatter: a block written into a layer-major KV destination at its token offset, checksummed there.
Imports numpy, torch, xxhash and ``layout`` only.

A block is ``[2, layers, kv_heads, t, head_dim]``; a :class:`KVDest` is ``[2, layers, kv_heads, capacity,
head_dim]``: the K and V of every layer of an attention cache, so a layer's K (``[kv_heads, capacity,
head_dim]``, C-contiguous) is a view a ``DynamicCache`` takes as it is. In the block, token rows come in
``2 * layers * kv_heads`` contiguous runs of ``t * head_dim`` elements; in the destination each run lands
``capacity * head_dim`` elements after the previous one. The copy is one strided numpy assignment (it
releases the GIL); the checksum is xxhash's streaming XXH3-64 updated over those runs *in the
destination*, in canonical order, which equals the one-shot XXH3-64 of the block's contiguous bytes (its
stored checksum): every byte a cache will use is verified where the cache reads it.

Measured on the 2-core sandbox (128 blocks of 16 SmolLM2-135M tokens, fp32, 94 MB, into an already
touched destination; best of 5, under the shared box's load): one contiguous memcpy of the same bytes
13-19 ms; the strided copy alone 13-32 ms; copy + streaming hash over the 23,040 runs of 4 KiB 23-47 ms
(the per-run Python call costs ~0.4 us, ~10 ms in all); copy + gathering each block back into a
cache-resident scratch + one-shot hash 19-69 ms (no better, and it needs the scratch); the same work on
two threads was no faster (4 KiB hash updates keep the GIL). A page fault per 4 KiB of an untouched
destination costs more than all of that (a fresh 94 MB buffer: ~130 ms), hence destinations that are
reused (the client's arena). Through the store (``TieredStore.scatter_out`` of those 2048 tokens from
the warm tier, best / median of 7): 46 / 53 ms, against 36 / 40 ms for ``copy_out`` into a plain region,
whose ``torch.cat`` into the cache's tensors afterwards took 216 / 780 ms in fresh memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from .layout import DTYPES, itemsize


@dataclass(frozen=True)
class KVDest:
    """Where a chain's blocks go: ``array`` is the destination's bytes, ``uint8 [2, layers, kv_heads,
    capacity, head_dim * itemsize]``, C-contiguous and writable; the first block's first token goes at
    token ``first_token``, each next block right after the previous one.

    :ivar dtype: element type name of the KV (a :data:`tiering.layout.DTYPES` key).
    Thread-safe for writes to disjoint token ranges.
    """

    array: np.ndarray
    dtype: str
    first_token: int = 0

    def __post_init__(self) -> None:
        a = self.array
        if a.dtype != np.uint8 or a.ndim != 5 or a.shape[0] != 2 or not a.flags.c_contiguous or not a.flags.writeable:
            raise ValueError("a KV destination is a writable C-contiguous uint8 array [2, layers, kv_heads, "
                             "capacity, head_dim * itemsize]")
        if self.dtype not in DTYPES or a.shape[4] % itemsize(self.dtype):
            raise ValueError(f"dtype {self.dtype!r} does not divide the destination's rows")
        if not 0 <= self.first_token <= a.shape[3]:
            raise ValueError(f"first token {self.first_token} is outside the {a.shape[3]}-token destination")

    @property
    def capacity(self) -> int:
        """Tokens the destination holds."""
        return int(self.array.shape[3])

    @property
    def geometry(self) -> tuple[str, int, int, int]:
        """``(dtype, layers, kv_heads, head_dim)``."""
        a = self.array
        return self.dtype, int(a.shape[1]), int(a.shape[2]), int(a.shape[4]) // itemsize(self.dtype)

    @property
    def token_bytes(self) -> int:
        """Bytes one token takes in a block of this geometry."""
        a = self.array
        return 2 * int(a.shape[1]) * int(a.shape[2]) * int(a.shape[4])

    def fits(self, dtype: str, shape: tuple[int, ...]) -> bool:
        """Whether a block of ``dtype`` and ``shape`` (``[2, layers, kv_heads, t, head_dim]``) has this geometry."""
        return len(shape) == 5 and shape[0] == 2 and (dtype, shape[1], shape[2], shape[4]) == self.geometry

    def _slab(self, token: int, tokens: int) -> np.ndarray:
        if not 0 <= token <= token + tokens <= self.capacity:
            raise ValueError(f"tokens [{token}, {token + tokens}) are outside the {self.capacity}-token destination")
        return self.array[:, :, :, token:token + tokens]

    def place(self, token: int, src, tokens: int) -> int:
        """Copy a block of ``tokens`` tokens (its contiguous bytes ``src``: any CPU buffer) to token
        ``token`` and return the XXH3-64 of what is now there (:meth:`checksum_at`).

        :raises ValueError: if the sizes or the token range do not fit.
        """
        slab = self._slab(token, tokens)
        data = np.frombuffer(src, dtype=np.uint8) if not isinstance(src, np.ndarray) else src.reshape(-1).view(np.uint8)
        if data.nbytes != slab.nbytes:
            raise ValueError(f"a block of {data.nbytes} bytes is not {tokens} tokens of this destination")
        np.copyto(slab, data.reshape(slab.shape))
        return self.checksum_at(token, tokens)

    def place_tensor(self, token: int, data: torch.Tensor, tokens: int) -> int:
        """:meth:`place` for a block's bytes on any device (a GPU block is copied device to host here)."""
        if data.device.type == "cpu":
            return self.place(token, data.numpy(), tokens)
        slab = self._slab(token, tokens)
        if data.numel() != slab.nbytes:
            raise ValueError(f"a block of {data.numel()} bytes is not {tokens} tokens of this destination")
        torch.from_numpy(self.array)[:, :, :, token:token + tokens].copy_(data.reshape(slab.shape))
        return self.checksum_at(token, tokens)

    def checksum_at(self, token: int, tokens: int) -> int:
        """XXH3-64 of the block of ``tokens`` tokens at token ``token``, read from the destination: the
        streaming hash over its runs in canonical order (equal to the one-shot hash of the block)."""
        self._slab(token, tokens)
        a = self.array
        row = int(a.shape[4])
        stride, run = self.capacity * row, tokens * row
        flat = memoryview(a.reshape(-1))
        h = xxhash.xxh3_64()
        update = h.update
        start = token * row
        for _ in range(2 * int(a.shape[1]) * int(a.shape[2])):
            update(flat[start:start + run])
            start += stride
        return h.intdigest()
