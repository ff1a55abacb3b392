"""The one chain read behind every Get path (``Get``, ``GetShm``, ``GetIpc``) and ``Prefetch``.

May import ``service.wire`` (convert, stubs), ``service.server`` (door, offload, quota) and ``tiering``.

A Get-shaped request names a *target* (explicit keys, or a session of the tenant) and a range
(``start_block``, ``max_blocks``). :func:`read_chain` resolves it once, for every data path:

* the chain: the keys named, or the session's chain (a session is always the tenant's own);
* ``readable``: keys named explicitly are cut at the first one not held for the tenant, before any
  load, so another tenant's block answers exactly like a miss and is neither read, promoted nor pinned;
* ``start_block`` past the chain is INVALID_ARGUMENT; ``max_blocks`` bounds the range.

:meth:`ChainRead.end` then says why the answer stopped, the same way on every path: the reason the
data path met (``miss``, ``region``, ``not_hot``, ``ipc_budget``, ``deadline``), else ``miss`` at a
foreign key, ``deadline`` when it ended early, ``max_blocks`` when the range ended before the chain.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from kvtier.service.server import door, offload
from kvtier.service.server.quota import Limits
from kvtier.service.wire import convert
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.tiering.errors import InvalidBlock
from kvtier.tiering.keys import BlockKey


@dataclass(frozen=True, slots=True)
class ChainRead:
    """The blocks a Get-shaped request asks for.

    :ivar chain: every key of the target, in prefix order.
    :ivar start: first block asked for (``start_block``).
    :ivar end: one past the last block asked for (``max_blocks`` applied).
    :ivar readable: blocks ``[start, readable)`` may be read; from ``readable`` on the next key is not
        the tenant's, and the answer stops there with a miss.
    """

    chain: list[BlockKey]
    start: int
    end: int
    readable: int

    @property
    def wanted(self) -> list[BlockKey]:
        """The keys a data path loads, in order: ``chain[start:readable]``."""
        return self.chain[self.start:self.readable]

    def rest(self, sent: int) -> list[bytes]:
        """Digests of the chain's keys after the ``sent`` blocks answered (for ``rest_keys``)."""
        return [k.digest for k in self.chain[self.start + sent:]]

    def end_message(self, sent: int, tokens: int, reason: str = "") -> pb.GetEnd:
        """The ``GetEnd`` of an answer that carried ``sent`` blocks of ``tokens`` tokens.

        :param reason: why the data path stopped, if it knows (``""``: it ran out of keys or time).
        """
        stopped = self.start + sent
        if not reason and stopped < self.end:
            # a data path ends early without a reason only at a foreign key (a miss) or the deadline
            reason = "miss" if stopped >= self.readable else "deadline"
        elif not reason and self.end < len(self.chain):
            reason = "max_blocks"
        return pb.GetEnd(blocks_sent=sent, complete=stopped == len(self.chain), stopped_at=stopped, reason=reason,
                         tokens=tokens)


async def target_keys(store, limits: Limits, request, tenant: str, rpc: str) -> tuple[list[BlockKey], list[BlockKey]]:
    """Keys named by a request's ``target`` oneof (explicit keys, or the chain of the tenant's session),
    and the prefix of them the tenant may touch (all of a session's chain, which is its own).

    :raises InvalidBlock: on no target, an empty or malformed key list, or a bad session id.
    :raises QuotaExceeded: if more keys are named than ``limits`` allow.
    :raises SessionNotFound: for an unknown session.
    """
    which = request.WhichOneof("target")
    if which == "keys":
        keys = named_keys(limits, request, rpc)
        owned = await offload.run(store.owned, keys, tenant)
        return keys, keys[:next((i for i, ok in enumerate(owned) if not ok), len(keys))]
    if which == "session_id":
        sid = door.session_id(tenant, request.session_id)
        session = await asyncio.to_thread(store.get_session, tenant, sid)
        return session.keys, session.keys
    raise InvalidBlock("target is required: keys or session_id", field="target")


async def read_chain(store, limits: Limits, request: pb.GetRequest, tenant: str, rpc: str = "Get") -> ChainRead:
    """Resolve a ``GetRequest`` (as sent to Get, or inside GetShm/GetIpc) for ``tenant``.

    :raises InvalidBlock: see :func:`target_keys`, and ``start_block`` past the chain.
    """
    chain, mine = await target_keys(store, limits, request, tenant, rpc)
    return _chain_range(request, chain, len(mine))


def named_keys(limits: Limits, request, rpc: str) -> list[BlockKey]:
    """The keys a request names explicitly (its ``target`` is ``keys``), validated.

    :raises InvalidBlock: on an empty or malformed key list. :raises QuotaExceeded: over ``limits``.
    """
    keys = convert.keys_from_proto(request.keys.keys, "keys.keys")
    if not keys:
        raise InvalidBlock("keys.keys is empty", field="keys.keys")
    limits.check_blocks(len(keys), rpc)
    return keys


def _chain_range(request, chain: list[BlockKey], mine: int) -> ChainRead:
    """The range of ``chain`` a request asks for; the tenant may touch its first ``mine`` keys.

    :raises InvalidBlock: for ``start_block`` past the chain."""
    start = request.start_block
    if start > len(chain):
        raise InvalidBlock(f"start_block {start} is past the {len(chain)} blocks of the chain", field="start_block")
    end = min(len(chain), start + request.max_blocks) if request.max_blocks else len(chain)
    return ChainRead(chain, start, end, max(start, min(end, mine)))


def read_resident(store, limits: Limits, request: pb.GetRequest, tenant: str, rpc: str = "Get"
                  ) -> tuple[ChainRead, list, str, Callable[[], None]] | None:
    """:func:`read_chain` and the blocks it asks for, at once and without a thread hand-off, when the
    request names its keys and every one up to its range's end is the tenant's, in host memory at the
    top of the store, and exact unless the request ``accept_lossy`` (``TieredStore.read_resident``: it
    never waits, so this may run on the event loop).

    :returns: ``(read, blocks, tier, release)``, the blocks (of ``read.wanted``, all in ``tier``) pinned until ``release()``; ``None`` otherwise,
        nothing read or pinned (then :func:`read_chain` and the store's reads are the way).
    :raises InvalidBlock, QuotaExceeded: as :func:`read_chain` for a bad key list or range.
    """
    if request.WhichOneof("target") != "keys":
        return None
    chain = named_keys(limits, request, rpc)
    read = _chain_range(request, chain, len(chain))

    def accept(block) -> bool:
        ns = store.namespace_of(block.ns_id)
        return ns is not None and ns.tenant == tenant and (request.accept_lossy or not block.lossy)

    got = store.read_resident(chain[:read.end], read.start, accept)
    return None if got is None else (read, *got)
