"""The sans-IO vocabulary of the clients: the steps an RPC is written as, and the two drivers that run them.

Imports grpc and the client's tracing, requests and types (a step's ``via`` channel is duck-typed:
``takes``/``start``, ``service/client/shm_control.py``). Every client call (``service/client/core.py``,
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
call's metadata and its CLIENT span (``service/client/tracing.py``), ended by :class:`Call`.
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


@dataclass(slots=True)
class Unary:
    """Make the unary (or client-streaming: ``request`` is then an iterator) call ``service/method``;
    through ``via`` (an arena's :class:`~kvtier.service.client.shm_control.ControlChannel`) when given and
    it :meth:`takes <kvtier.service.client.shm_control.ControlChannel.takes>` the request, else over gRPC."""

    method: str
    request: object
    timeout: float | None
    service: str = KVCACHE
    wait_for_ready: bool = False
    via: object | None = None


@dataclass(slots=True)
class Stream:
    """Make the server-streaming call ``method``; each response message goes to ``feed`` (which may raise:
    the call is then cancelled and the error thrown into the steps)."""

    method: str
    request: object
    timeout: float | None
    feed: Callable[[object], None]
    service: str = KVCACHE


@dataclass(slots=True)
class Wait:
    """Look again after at most ``seconds``; a blocking driver wakes early when ``condition`` is notified."""

    seconds: float
    condition: threading.Condition | None = None


@dataclass(slots=True)
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
        #: The tracer of the provider installed when the transport was made (``None``: no tracing).
        self.tracer = tracing.tracer()

    def call(self, step: Unary | Stream) -> "Call":
        """The call ``step`` asks for: its stub method (or its control channel's ``start``, then
        :attr:`Call.pending`) and keyword arguments, and its span (if traced)."""
        if step.service != KVCACHE:
            return Call(getattr(self.stubs[step.service], step.method),
                        {"timeout": step.timeout, "wait_for_ready": getattr(step, "wait_for_ready", False)})
        via = step.via if isinstance(step, Unary) else None
        if via is not None and via.takes(step.request):
            metadata, span = tracing.start_call(self.tracer, step.service, step.method, self.peer, None)
            if span is not None:
                span.set_attribute("kvtier.transport", "unix-control")
            return Call(via.start, {"method": step.method, "timeout": step.timeout, "trace": dict(metadata or ())},
                        span, pending=True)
        metadata, span = tracing.start_call(self.tracer, step.service, step.method, self.peer, self.metadata)
        return Call(getattr(self.stubs[step.service], step.method), {"timeout": step.timeout, "metadata": metadata},
                    span)


class Call:
    """One call about to be made; as a context, it ends the call's span (if any) with the call's status.

    :ivar pending: whether ``method`` returns a :class:`~kvtier.service.client.shm_control.Pending` (a
        call on an arena's socket) that the blocking driver waits for with ``result()``; both it and a
        ``grpc.aio`` call are awaitable.
    """

    __slots__ = ("method", "kwargs", "span", "pending")

    def __init__(self, method: Callable, kwargs: dict, span=None, *, pending: bool = False) -> None:
        self.method, self.kwargs, self.span, self.pending = method, kwargs, span, pending

    def __enter__(self) -> "Call":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if self.span is not None:
            tracing.end(self.span, exc)


def _mapped(exc: BaseException) -> BaseException:
    """What to throw into the steps for ``exc``: a ``grpc.RpcError`` as :class:`KVTierClientError`."""
    if isinstance(exc, grpc.RpcError):
        err = client_error(exc)
        err.__suppress_context__ = True
        return err
    return exc


class _Progress:
    """Where a driver is in ``steps``: what to send in next (a result, or an error to throw in)."""

    __slots__ = ("steps", "sent", "error", "value")

    def __init__(self, steps: Steps) -> None:
        self.steps, self.sent, self.error, self.value = steps, None, None, None

    def next(self) -> Step | None:
        """The next step, or ``None`` once the steps returned (their result is then :attr:`value`)."""
        try:
            step = self.steps.send(self.sent) if self.error is None else self.steps.throw(self.error)
        except StopIteration as done:
            self.value = done.value
            return None
        self.sent = self.error = None
        return step


def run(steps: Steps, transport: Transport):
    """Run ``steps`` in this thread: calls in place, waits on their condition (or a sleep).

    :returns: what ``steps`` return. :raises: what they raise (gRPC errors as ``KVTierClientError``).
    """
    state = _Progress(steps)
    while (step := state.next()) is not None:
        try:
            if isinstance(step, Unary):
                with transport.call(step) as call:
                    state.sent = call.method(step.request, **call.kwargs)
                    if call.pending:
                        state.sent = state.sent.result()
            elif isinstance(step, Stream):
                with transport.call(step) as call:
                    _drain(call, step)
            elif isinstance(step, Wait):
                _block(step)
            else:
                state.sent = step.fn(*step.args)
        except BaseException as exc:  # into the steps, so their cleanup runs; they re-raise it
            state.error = _mapped(exc)
    return state.value


def _block(step: Wait) -> None:
    if step.condition is None:
        threading.Event().wait(step.seconds)
        return
    with step.condition:
        step.condition.wait(step.seconds)


def _drain(call: Call, step: Stream) -> None:
    stream = call.method(step.request, **call.kwargs)
    try:
        for msg in stream:
            step.feed(msg)
    except KVTierClientError:
        stream.cancel()
        raise


async def run_async(steps: Steps, transport: Transport):
    """:func:`run` on the running event loop, which it never blocks (waits poll; blocking work runs in
    a worker thread)."""
    state = _Progress(steps)
    while (step := state.next()) is not None:
        try:
            if isinstance(step, Unary):
                with transport.call(step) as call:
                    state.sent = await call.method(step.request, **call.kwargs)
            elif isinstance(step, Stream):
                with transport.call(step) as call:
                    await _drain_async(call, step)
            elif isinstance(step, Wait):
                await asyncio.sleep(step.seconds)
            else:
                state.sent = await asyncio.to_thread(step.fn, *step.args)
        except BaseException as exc:  # cancellation too: the steps give back their arena ranges
            state.error = _mapped(exc)
    return state.value


async def _drain_async(call: Call, step: Stream) -> None:
    stream = call.method(step.request, **call.kwargs)
    try:
        async for msg in stream:
            step.feed(msg)
    except KVTierClientError:
        stream.cancel()
        raise
