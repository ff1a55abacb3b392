"""PresizedLayer: a ``DynamicCache`` layer whose K and V are views of buffers with room, so an append copies
only the new tokens. May import torch and transformers only.

transformers 5.24's ``DynamicLayer.update`` appends with ``torch.cat``: every forward copies the layer's
whole cache into fresh memory (for a restored 2048-token SmolLM2-135M cache in fp32, 94 MB per forward
over all layers, page faults included). A :class:`PresizedLayer` holds K and V as the first ``n`` tokens of
buffers of ``capacity`` tokens (a restored cache's destination tensors, ``service/client/kvget.py``): an
update writes the new tokens into the room and hands the model longer views of the same buffers. When
the room runs out it moves to buffers half again as large as needed (one copy, which ``DynamicLayer`` makes
on every update), so decoding copies the cache O(log n) times instead of once per token.

Everything else is ``DynamicLayer``'s (it is one, for every check transformers makes): ``crop`` shortens
the views (the room grows back); when another method replaces K or V with tensors of its own (``reset``,
``batch_repeat_interleave``, ``batch_select_indices``), the layer sees that its views no longer start its
buffers and appends as ``DynamicLayer`` does from then on. Not thread-safe (as a cache is not).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

#: Tokens of room a layer that outgrows its buffers gets at least, on top of half what it then holds.
MIN_GROWTH = 64


def _starts(view: torch.Tensor | None, buf: torch.Tensor) -> bool:
    """Whether ``view`` is the first tokens of ``buf`` (same memory, layout and leading dimensions)."""
    return (view is not None and view.dim() == 4 and view.data_ptr() == buf.data_ptr()
            and view.stride() == buf.stride() and view.shape[:2] == buf.shape[:2] and view.shape[3] == buf.shape[3])


class PresizedLayer(DynamicLayer):
    """A cache layer over K/V buffers ``[batch, kv_heads, capacity, head_dim]`` whose first ``tokens`` tokens
    are the cache (module docstring).

    :param keys, values: the buffers; they become the layer's (its views keep them alive).
    :param tokens: how many leading tokens hold the cache (``0 <= tokens <= capacity``).
    :raises ValueError: if the buffers' shapes differ or ``tokens`` is out of range.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, tokens: int) -> None:
        super().__init__()
        if keys.dim() != 4 or keys.shape != values.shape or not 0 <= tokens <= keys.shape[2]:
            raise ValueError(f"buffers {tuple(keys.shape)} / {tuple(values.shape)} cannot hold {tokens} tokens")
        self.lazy_initialization(keys, values)
        self._bufs = (keys, values)
        self.keys, self.values = keys[:, :, :tokens], values[:, :, :tokens]

    @property
    def capacity(self) -> int:
        """Tokens the layer holds before its next update copies (0 once its views are not its buffers')."""
        return self._bufs[0].shape[2] if self._own() else 0

    def _own(self) -> bool:
        return self.is_initialized and _starts(self.keys, self._bufs[0]) and _starts(self.values, self._bufs[1])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens in place (into the room, else into larger buffers) and return the layer's
        K and V: views of its buffers. A layer whose views are no longer its buffers' appends as
        ``DynamicLayer`` does (a copy)."""
        if not self._own():
            return super().update(key_states, value_states, *args, **kwargs)
        n, m = self.keys.shape[2], key_states.shape[2]
        if n + m > self._bufs[0].shape[2]:
            self._grow(n + m + max((n + m) // 2, MIN_GROWTH))
        keys, values = self._bufs
        keys[:, :, n:n + m].copy_(key_states)
        values[:, :, n:n + m].copy_(value_states)
        self.keys, self.values = keys[:, :, :n + m], values[:, :, :n + m]
        return self.keys, self.values

    def _grow(self, capacity: int) -> None:
        """Move the cache into fresh buffers of ``capacity`` tokens (the old ones go with their last view)."""
        n = self.keys.shape[2]
        bufs = []
        for old in self._bufs:
            new = old.new_empty((*old.shape[:2], capacity, old.shape[3]))
            new[:, :, :n].copy_(old[:, :, :n])
            bufs.append(new)
        self._bufs = (bufs[0], bufs[1])
        self.keys, self.values = bufs[0][:, :, :n], bufs[1][:, :, :n]
