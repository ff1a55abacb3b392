"""PutAssembler: checks a Put stream message by message and reassembles whole blocks.

May import ``service.wire``, ``service.server`` (door, errors) and ``tiering`` (codec, errors, keys).

A Put stream is one ``PutHeader`` and then ``BlockChunk`` messages. :func:`plan_from_header` validates
the header (namespace, token ids, ``first_block``/``block_count`` against
``ceil(len(token_ids)/block_tokens)``, the session's record key and the chain's reply size at the
door: ``service/server/door.py``), and the assembler every chunk as it arrives: at most
:data:`MAX_CHUNK_BYTES`, ``block_index`` sequential from ``first_block``, offsets contiguous from 0,
no block longer than its layout allows, a checksum only on a block's last chunk.
:meth:`PutAssembler.finish` checks that every declared block arrived whole and verifies the checksums
given. Nothing here touches the store: the servicer hands the finished blocks to the store in one
call, so a broken or cancelled stream stores nothing.

Memory grows with the bytes that arrive, never with what a header declares: a block's chunks are
kept as they came (views of the received messages) and joined into one ``bytearray`` when the block
is whole (one copy per byte received), so a 40-byte header declaring 256 MiB costs nothing until
256 MiB arrive. Not thread-safe; one assembler per stream. :func:`next_message` reads a stream with
the server's idle timeout.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kvtier.service.wire import convert
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.server import door
from kvtier.service.server.errors import QuotaExceeded, StreamIdle
from kvtier.tiering.codec import checksum
from kvtier.tiering.errors import InvalidBlock
from kvtier.tiering.keys import Namespace

#: Largest ``BlockChunk.data`` accepted (and sent by Get): 1 MiB.
MAX_CHUNK_BYTES = 1 << 20


@dataclass(slots=True)
class PutPlan:
    """A validated ``PutHeader``: what the store's ``put`` will be called with."""

    namespace: Namespace
    token_ids: np.ndarray
    first_block: int
    block_count: int
    session_id: str | None
    durable: bool
    priority: int
    ttl_s: float | None
    #: payload bytes of the declared blocks (their layout's sizes)
    declared_bytes: int = 0

    def block_tokens(self, index: int) -> int:
        """Tokens covered by block ``index`` of the sequence (the last one may be partial)."""
        bt = self.namespace.layout.block_tokens
        return min(bt, len(self.token_ids) - index * bt)


def plan_from_header(header: pb.PutHeader, tenant: str, *, max_bytes: int = 0,
                     max_message_bytes: int = 0) -> PutPlan:
    """Validate a ``PutHeader``.

    :param tenant: the caller's tenant, already resolved by :func:`service.convert.tenant_of`.
    :param max_bytes: most payload bytes the declared blocks may add up to (0 = no limit).
    :param max_message_bytes: the server's message size limit: the chain's replies must fit it
        (:func:`service.server.door.check_chain`; 0 = no limit).
    :raises InvalidBlock: naming the first bad field.
    :raises QuotaExceeded: if the declared blocks hold more than ``max_bytes`` bytes, or the chain is
        too long for its replies.
    """
    ns = convert.namespace_from_proto(header.namespace, "header.namespace", tenant=tenant)
    if not header.token_ids:
        raise InvalidBlock("header.token_ids is required: every token the blocks cover", field="header.token_ids")
    n_blocks = math.ceil(len(header.token_ids) / ns.layout.block_tokens)
    door.check_chain(n_blocks, max_message_bytes, "Put")
    tokens = np.fromiter(header.token_ids, dtype=np.uint32, count=len(header.token_ids))
    if header.first_block > n_blocks:
        raise InvalidBlock(f"header.first_block {header.first_block} is past the {n_blocks} blocks of "
                           f"{len(tokens)} tokens", field="header.first_block")
    if header.first_block + header.block_count > n_blocks:
        raise InvalidBlock(f"{header.block_count} blocks from index {header.first_block} do not fit the "
                           f"{n_blocks} blocks of {len(tokens)} tokens", field="header.block_count")
    lay = ns.layout
    last = header.first_block + header.block_count - 1
    declared = (header.block_count - 1) * lay.block_bytes() + lay.block_bytes(
        min(lay.block_tokens, len(tokens) - last * lay.block_tokens)) if header.block_count else 0
    if max_bytes and declared > max_bytes:
        # Checked before any chunk is read: the stream is buffered whole, so this bounds its memory.
        raise QuotaExceeded(f"the header declares {header.block_count} blocks of {declared} bytes; a Put "
                            f"may carry at most {max_bytes} bytes (split it into several Puts)",
                            subject="request:put_bytes")
    session_id = door.session_id(tenant, header.session_id, "header.session_id", required=False)
    ttl = header.ttl_seconds
    if not math.isfinite(ttl) or ttl < 0:
        raise InvalidBlock("header.ttl_seconds must be a finite number >= 0", field="header.ttl_seconds")
    return PutPlan(ns, tokens, header.first_block, header.block_count, session_id, header.durable,
                   header.priority, ttl or None, declared)


async def next_message(stream, idle_s: float = 0):
    """The next message of a request ``stream`` (an async iterator), ``None`` at its end.

    :param idle_s: seconds the caller may stay silent (0 = forever; its deadline, if any, still applies).
    :raises StreamIdle: when nothing came for ``idle_s`` seconds: the server stops waiting, so a
        half-open stream without a deadline cannot hold its place for ever.
    """
    if not idle_s:
        return await anext(stream, None)
    try:
        async with asyncio.timeout(idle_s):
            return await anext(stream, None)
    except TimeoutError:
        raise StreamIdle(f"the stream sent nothing for {idle_s:g} s (server.stream_idle_s); it was closed and "
                         "nothing was stored") from None


@dataclass(slots=True)
class _Partial:
    """A block being received: its chunks as they came (no copy yet), and how many bytes they hold."""

    index: int
    size: int
    parts: list = field(default_factory=list)
    filled: int = 0


@dataclass(slots=True)
class PutAssembler:
    """Accumulates the chunks of one Put stream (see the module docstring)."""

    plan: PutPlan
    #: where a whole block's bytes go (``n -> uint8 array``: the store's host pool, memory already faulted
    #: in); ``None``: a fresh ``bytearray``
    alloc: Callable[[int], np.ndarray] | None = None
    blocks: list[bytearray | np.ndarray] = field(default_factory=list)
    #: (position in ``blocks``, checksum the client sent) for every block that carried one
    checksums: list[tuple[int, int]] = field(default_factory=list)
    _cur: _Partial | None = None

    def _open(self, index: int) -> _Partial:
        return _Partial(index, self.plan.namespace.layout.block_bytes(self.plan.block_tokens(index)))

    def add(self, chunk: pb.BlockChunk) -> None:
        """Take one chunk.

        :raises InvalidBlock: if it is out of order, out of bounds, too big, empty, or beyond the
            blocks the header declared.
        """
        plan = self.plan
        expected = plan.first_block + len(self.blocks)
        if len(self.blocks) >= plan.block_count:
            raise InvalidBlock(f"the header declared {plan.block_count} blocks; chunk for block "
                               f"{chunk.block_index} is one too many", field="chunk.block_index")
        if chunk.block_index != expected:
            raise InvalidBlock(f"chunk for block {chunk.block_index} arrived where block {expected} was expected "
                               "(blocks come in order, each whole before the next)", field="chunk.block_index")
        if not chunk.data:
            raise InvalidBlock("chunk.data is empty", field="chunk.data")
        if len(chunk.data) > MAX_CHUNK_BYTES:
            raise InvalidBlock(f"chunk of {len(chunk.data)} bytes; chunks are at most {MAX_CHUNK_BYTES} bytes",
                               field="chunk.data")
        cur = self._cur if self._cur is not None else self._open(expected)
        if chunk.offset != cur.filled:
            raise InvalidBlock(f"chunk offset {chunk.offset} of block {expected}; expected {cur.filled} "
                               "(chunks are contiguous from 0)", field="chunk.offset")
        end = cur.filled + len(chunk.data)
        if end > cur.size:
            raise InvalidBlock(f"block {expected} would grow to {end} bytes; its layout "
                               f"{plan.namespace.layout.describe()} holds {cur.size} bytes for "
                               f"{plan.block_tokens(expected)} tokens", field="chunk.data")
        if chunk.checksum and end != cur.size:
            raise InvalidBlock(f"checksum on a chunk that is not the last of block {expected}",
                               field="chunk.checksum")
        cur.parts.append(chunk.data)
        cur.filled = end
        if end == cur.size:
            if chunk.checksum:
                self.checksums.append((len(self.blocks), chunk.checksum))
            self.blocks.append(self._join(cur))
            self._cur = None
        else:
            self._cur = cur

    def _join(self, cur: _Partial) -> bytearray | np.ndarray:
        """The one copy of a block's parts into memory of its own."""
        if self.alloc is None:
            return bytearray().join(cur.parts)  # sizes its result once and copies each part into it
        out = self.alloc(cur.size)
        pos = 0
        for part in cur.parts:
            out[pos:pos + len(part)] = np.frombuffer(part, dtype=np.uint8)
            pos += len(part)
        return out

    def finish(self) -> list[bytearray | np.ndarray]:
        """The whole blocks, in order, after checking that all arrived and their checksums match.

        Verifying hashes every block given a checksum: call it off the event loop.

        :raises InvalidBlock: if a block is incomplete, blocks are missing, or a checksum differs.
        """
        plan = self.plan
        if self._cur is not None:
            raise InvalidBlock(f"stream ended inside block {self._cur.index}: {self._cur.filled} of "
                               f"{self._cur.size} bytes arrived", field="chunk.data")
        if len(self.blocks) != plan.block_count:
            raise InvalidBlock(f"the header declared {plan.block_count} blocks but {len(self.blocks)} arrived",
                               field="header.block_count")
        for pos, expected in self.checksums:
            got = checksum(self.blocks[pos])
            if got != expected:
                raise InvalidBlock(f"block {plan.first_block + pos}: checksum {got:#018x} of the bytes received "
                                   f"differs from {expected:#018x} sent", field="chunk.checksum")
        return self.blocks
