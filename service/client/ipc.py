"""The client's end of CUDA IPC gets: hot blocks copied device to device from the server's GPU.

:func:`get_on_device_steps` serves ``KVTierClient.get(..., device=...)``. When ``device`` is a CUDA device of
this process and the client holds a shared-memory link (the server is on this host), it runs
``GetIpc`` for the hot prefix of the chain, copies each block out of the shared buffer onto ``device``
(:func:`service.shm.cuda_ipc.copy_out` waits for the copies and unmaps the buffer before returning)
and calls ``ReleaseIpc`` in a ``finally``; while the server stops for its budget (``"ipc_budget"``)
after some blocks, it asks again for the rest. Whatever remains of the chain (from the first block
that is not hot) is fetched through the client's usual path and moved onto ``device``, as is
everything when CUDA IPC cannot serve: no CUDA in this process, no link, or the server answers
FAILED_PRECONDITION (no CUDA hot tier, another GPU, another user, shared memory off) or UNIMPLEMENTED
(an older server). Nothing of that is remembered: every call asks again, one unary call.

Written as steps (``service/client/steps.py``), so the blocking and the asyncio client share it; the
CUDA copies are a blocking step (off the event loop in the asyncio client). Imports wire/ and the
client's steps and types.

Checksums. Blocks that come by CUDA IPC are not verified here: a device tensor's XXH3 needs a copy to
the host, the very trip CUDA IPC saves. Their checksum was taken as they entered the server (and
checked, when the writer sent one; blocks read back from disk are checked on their way up), and they
move only from GPU memory to GPU memory. Blocks fetched for the rest of the chain are checked as
that path checks them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch

from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.client.requests import rest_request
from kvtier.service.client.steps import KVCACHE, Blocking, Steps, Transport, Unary, run
from kvtier.service.client.types import TORCH_DTYPES, GetResult, KVTierClientError
from kvtier.service.wire import cuda_ipc
from kvtier.tiering.keys import BlockKey

log = logging.getLogger(__name__)

#: Codes with which a server says "not by CUDA IPC" (the usual path serves instead).
FALLBACK_CODES = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED)
#: Stop reasons after which the chain goes on past the blocks sent.
_RESUMABLE = ("not_hot", "ipc_budget")


def cuda_device(device: torch.device | str | None) -> torch.device | None:
    """``device`` with its index when it names a CUDA device this process can use, else ``None``."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


@dataclass
class _Hot:
    """What the ``GetIpc`` calls of one get brought: blocks on the device, and where the chain goes on.

    :ivar rest: the request for the rest of the chain (by keys), or ``None`` when the answer is final.
    :ivar base: index (in the caller's chain) of the first block ``rest`` names.
    """

    blocks: list[torch.Tensor] = field(default_factory=list)
    keys: list[BlockKey] = field(default_factory=list)
    lossy: list[bool] = field(default_factory=list)
    end: pb.GetEnd | None = None
    base: int = 0
    rest: pb.GetRequest | None = None


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.001)


def _release(deadline: float | None, lease_id: str) -> Steps:
    """``ReleaseIpc``, best effort: an unreleased lease ends on its own after the server's lease time."""
    try:
        yield Unary("ReleaseIpc", pb.ReleaseIpcRequest(lease_id=lease_id),
                    5.0 if deadline is None else max(deadline - time.monotonic(), 0.5))
    except KVTierClientError as exc:
        log.debug("ReleaseIpc failed (%s); the server ends the lease by itself", exc.code.name)


def _copy_blocks(resp: pb.GetIpcResponse, device: torch.device, base: int) -> list[torch.Tensor]:
    """The blocks of one ``GetIpc`` answer as tensors on ``device``.

    :raises KVTierClientError: ``INTERNAL`` for an answer whose buffer or headers do not hold up.
    :raises RuntimeError: from CUDA, when the buffer cannot be mapped on ``device``.
    """
    try:
        raw = cuda_ipc.copy_out(resp.buffer, device, [(item.offset, item.header.size) for item in resp.blocks])
    except ValueError as exc:
        raise KVTierClientError(grpc.StatusCode.INTERNAL, f"unusable CUDA IPC answer: {exc}") from None
    out = []
    for item, data in zip(resp.blocks, raw):
        head = item.header
        dtype, shape = TORCH_DTYPES.get(head.dtype), tuple(head.shape)
        if (dtype is None or len(shape) != 5 or data.numel() != head.size
                or head.size != dtype.itemsize * torch.Size(shape).numel()):
            raise KVTierClientError(grpc.StatusCode.INTERNAL,
                                    f"block {base + head.index}: {head.size} bytes do not hold {head.dtype} {shape}")
        out.append(data.view(dtype).reshape(shape))
    return out


def _get_hot(deadline: float | None, arena_id: str, request: pb.GetRequest, device: torch.device) -> Steps:
    """Steps giving the hot prefix of ``request``'s chain by CUDA IPC (a :class:`_Hot`), or ``None``:
    the server does not serve this caller so (use the usual path for all of it).

    :raises KVTierClientError: as the server answers (other than :data:`FALLBACK_CODES`).
    """
    uuid = cuda_ipc.device_uuid(device)
    got = _Hot()
    while True:
        try:
            resp = yield Unary("GetIpc", pb.GetIpcRequest(arena_id=arena_id, request=request, device_uuid=uuid),
                               _left(deadline))
        except KVTierClientError as exc:
            if exc.code not in FALLBACK_CODES:
                raise
            log.debug("no CUDA IPC from the server (%s: %s)", exc.code.name, exc.details)
            if not got.blocks:
                return None
            got.rest = request  # a later piece was refused: the rest comes the usual way
            return got
        try:
            blocks = (yield Blocking(_copy_blocks, (resp, device, got.base))) if resp.blocks else []
        except RuntimeError as exc:  # CUDA cannot map it here (the buffer's reference went back already)
            log.debug("CUDA IPC buffer not mappable on %s (%s); using the usual path", device, exc)
            blocks = None
        finally:
            if resp.lease_id:
                yield from _release(deadline, resp.lease_id)
        if blocks is None:
            got.rest = request
            return got if got.blocks else None
        got.blocks += blocks
        got.keys += [BlockKey(bytes(item.header.key)) for item in resp.blocks]
        got.lossy += [item.header.lossy for item in resp.blocks]
        end = got.end = resp.end
        if end.reason not in _RESUMABLE:
            return got
        # the rest of the same chain, by its keys (a session might change between two calls)
        left = request.max_blocks - (end.stopped_at - request.start_block) if request.max_blocks else 0
        request = rest_request(request, resp.rest_keys, left)
        got.base += end.stopped_at
        got.rest = request
        if end.reason == "not_hot" or not resp.blocks:
            return got


def get_on_device(stub, metadata, timeout: float | None, link, request: pb.GetRequest, device: torch.device,
                  fetch: Callable[[pb.GetRequest, float | None], GetResult]) -> GetResult:
    """:func:`get_on_device_steps` run in this thread over a blocking ``stub`` (with ``metadata``), the
    rest of the chain fetched by ``fetch`` (a plain function of a request and a timeout)."""
    def fetch_steps(req: pb.GetRequest, left: float | None) -> Steps:
        return fetch(req, left)
        yield  # noqa: unreachable - makes this a generator of no steps

    return run(get_on_device_steps(timeout, link, request, device, fetch_steps), Transport({KVCACHE: stub}, metadata, ""))


def get_on_device_steps(timeout: float | None, link, request: pb.GetRequest, device: torch.device,
                        fetch: Callable[[pb.GetRequest, float | None], Steps]) -> Steps:
    """Steps of a get whose blocks end up on ``device`` (module docstring); they return a :class:`GetResult`.

    :param link: the client's shared-memory link (``None``: no CUDA IPC).
    :param fetch: the client's usual get of a request, with a timeout in seconds, as steps.
    :raises KVTierClientError: as the calls fail (``DATA_LOSS`` for a block of the usual path that fails
        its checksum).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    hot = None
    if link is not None and cuda_device(device) is not None:
        hot = yield from _get_hot(deadline, link.arena_id, request, cuda_device(device))
    if hot is None:
        got = yield from fetch(request, timeout)
        return GetResult([b.to(device) for b in got.blocks], got.keys, got.tiers, got.complete, got.stopped_at,
                         got.reason, got.tokens, got.lossy)
    tokens = sum(int(b.shape[3]) for b in hot.blocks)
    if hot.rest is None:
        end = hot.end
        return GetResult(hot.blocks, hot.keys, ["hot"] * len(hot.blocks), end.complete,
                         None if end.complete else hot.base + end.stopped_at, end.reason, tokens, hot.lossy)
    rest = yield from fetch(hot.rest, _left(deadline))
    return GetResult(hot.blocks + [b.to(device) for b in rest.blocks], hot.keys + rest.keys,
                     ["hot"] * len(hot.blocks) + rest.tiers, rest.complete,
                     None if rest.complete else hot.base + rest.stopped_at, rest.reason, tokens + rest.tokens,
                     hot.lossy + rest.lossy)
