"""The sans-IO vocabulary of the clients: the steps an RPC is written as, and the two drivers that run them.

Imports grpc and the client's tracing, requests and types. Every client call (``service/client/core.py``,
``shm.py``, ``ipc.py``) is a generator of *steps*, written once:

* :class:`Unary` — make one unary (or client-streaming) call; the generator is sent its response;
* :class:`Stream` — make one server-streaming call, handing each message to ``feed``; sent ``None``;
* :class:`Wait` — nothing to do for a while (no arena range free, a link being opened elsewhere);
* :class:`Blocking` — run a blocking function (a socket exchange, a CUDA copy); sent its result.

A failed step is thrown into the generator, a ``grpc.RpcError`` already turned into
:class:`~kvtier.service.client.types.KVTierClientError`, so the steps' ``finally`` blocks give back what
they hold and their ``except`` clauses see one error type. The generator's return value is the call's.

:func:`run` drives steps in the calling thread (the blocking client); :func:`run_async` on an event
loop (the asyncio client), never blocking it: waits are ``asyncio.sleep``, blocking work runs in
``asyncio.to_thread``. :class:`Transport` is what both drivers share: which stub serves a step, the
call's metadata and its CLIENT span (``service/client/tracing.py``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass

import grpc

from kvtier.service.client import tracing
from kvtier.service.client.requests import client_error
from kvtier.service.client.types import KVTierClientError

#: The kvtier service and the health service (their full names, as steps name them).
KVCACHE = "kvtier.v1.KVCache"
HEALTH = "grpc.health.v1.Health"


@dataclass(frozen=True, slots=True)
class Unary:
    """Make the unary (or client-streaming: ``request`` is then an iterator) call ``service/method``."""

    method: str
    request: object
    timeout: float | None
    service: str = KVCACHE
    wait_for_ready: bool = False


@dataclass(frozen=True, slots=True)
class Stream:
    """Make the server-streaming call ``method``; each response message goes to ``feed`` (which may raise:
    the call is then cancelled and the error thrown into the steps)."""

    method: str
    request: object
    timeout: float | None
    feed: Callable[[object], None]
    service: str = KVCACHE


@dataclass(frozen=True, slots=True)
class Wait:
    """Look again after at most ``seconds``; a blocking driver wakes early when ``condition`` is notified."""

    seconds: float
    condition: threading.Condition | None = None


@dataclass(frozen=True, slots=True)
class Blocking:
    """Run ``fn(*args)``, which may block (off the event loop in an asyncio driver)."""

    fn: Callable
    args: tuple = ()


Step = Unary | Stream | Wait | Blocking
#: A client call: yields steps, is sent their results (or has their errors thrown in), returns the answer.
Steps = Generator[Step, object, object]


class Transport:
    """The stubs of one channel, the metadata every kvtier call carries and where calls go (for spans).

    :param stubs: service name (:data:`KVCACHE`, :data:`HEALTH`) -> stub (blocking or ``grpc.aio``).
        A step's method is looked up on its stub at call time.
    :param metadata: sent with every kvtier call (the bearer token); health checks go without it.
    :param target: the channel's target, for the spans' ``server.address``/``server.port``.
    """

    def __init__(self, stubs: dict[str, object], metadata: tuple[tuple[str, str], ...] | None, target: str) -> None:
        self.stubs = stubs
        self.metadata = metadata
        self.peer = tracing.peer_attributes(target)

    def begin(self, step: Unary | Stream) -> tuple[Callable, dict, object]:
        """The stub method of ``step``, the keyword arguments of its call and its span (or ``None``)."""
        method = getattr(self.stubs[step.service], step.method)
        if step.service != KVCACHE:
            return method, {"timeout": step.timeout, "wait_for_ready": getattr(step, "wait_for_ready", False)}, None
        metadata, span = tracing.start_call(step.service, step.method, self.peer, self.metadata)
        return method, {"timeout": step.timeout, "metadata": metadata}, span


def _mapped(exc: BaseException) -> BaseException:
    """What to throw into the steps for ``exc``: a ``grpc.RpcError`` as :class:`KVTierClientError`."""
    if isinstance(exc, grpc.RpcError):
        err = client_error(exc)
        err.__suppress_context__ = True
        return err
    return exc


@dataclass(frozen=True, slots=True)
class _Done:
    value: object


def _advance(steps: Steps, sent: object, error: BaseException | None) -> Step | _Done:
    """The next step of ``steps`` after ``sent`` (or ``error`` thrown in), or :class:`_Done`."""
    try:
        return steps.send(sent) if error is None else steps.throw(error)
    except StopIteration as done:
        return _Done(done.value)


def run(steps: Steps, transport: Transport):
    """Run ``steps`` in this thread: calls in place, waits on their condition (or a sleep).

    :returns: what ``steps`` return. :raises: what they raise (gRPC errors as ``KVTierClientError``).
    """
    sent, error = None, None
    while not isinstance(step := _advance(steps, sent, error), _Done):
        sent, error = None, None
        try:
            if isinstance(step, Wait):
                _block(step)
            elif isinstance(step, Blocking):
                sent = step.fn(*step.args)
            else:
                method, kwargs, span = transport.begin(step)
                with tracing.ending(span):
                    sent = method(step.request, **kwargs) if isinstance(step, Unary) else _drain(method, step, kwargs)
        except BaseException as exc:  # into the steps, so their cleanup runs; they re-raise it
            error = _mapped(exc)
    return step.value


def _block(step: Wait) -> None:
    if step.condition is None:
        threading.Event().wait(step.seconds)
        return
    with step.condition:
        step.condition.wait(step.seconds)


def _drain(method: Callable, step: Stream, kwargs: dict) -> None:
    call = method(step.request, **kwargs)
    try:
        for msg in call:
            step.feed(msg)
    except KVTierClientError:
        call.cancel()
        raise


async def run_async(steps: Steps, transport: Transport):
    """:func:`run` on the running event loop, which it never blocks (waits poll; blocking work runs in
    a worker thread)."""
    sent, error = None, None
    while not isinstance(step := _advance(steps, sent, error), _Done):
        sent, error = None, None
        try:
            if isinstance(step, Wait):
                await asyncio.sleep(step.seconds)
            elif isinstance(step, Blocking):
                sent = await asyncio.to_thread(step.fn, *step.args)
            else:
                method, kwargs, span = transport.begin(step)
                with tracing.ending(span):
                    if isinstance(step, Unary):
                        sent = await method(step.request, **kwargs)
                    else:
                        await _drain_async(method, step, kwargs)
        except BaseException as exc:  # cancellation too: the steps give back their arena ranges
            error = _mapped(exc)
    return step.value


async def _drain_async(method: Callable, step: Stream, kwargs: dict) -> None:
    call = method(step.request, **kwargs)
    try:
        async for msg in call:
            step.feed(msg)
    except KVTierClientError:
        call.cancel()
        raise
