"""The error boundary: the one place where engine errors become gRPC statuses.

Every RPC handler of :class:`service.servicer.KVCacheServicer` is wrapped by :func:`grpc_errors`, so
no handler catches anything itself. The mapping (``google.rpc.Status`` details via grpcio-status,
readable with ``grpc_status.rpc_status.from_call``):

=====================================  ======================  ====================================
raised                                 status                  details
=====================================  ======================  ====================================
``InvalidBlock``                       ``INVALID_ARGUMENT``    ``BadRequest`` naming ``exc.field``
``BlockNotFound``/``SessionNotFound``  ``NOT_FOUND``
``LayoutMismatch``                     ``FAILED_PRECONDITION``
``CapacityExceeded``                   ``RESOURCE_EXHAUSTED``  ``QuotaFailure`` (subject
                                                               ``kvtier:capacity``, or the limit hit:
                                                               ``service/server/quota.py``)
``TierUnavailable``                    ``UNAVAILABLE``
``auth.Unauthenticated``               ``UNAUTHENTICATED``
``auth.PermissionDenied``              ``PERMISSION_DENIED``
``DecodeError`` (unparsable message)   ``INVALID_ARGUMENT``    (bad wire bytes, non-UTF-8 string)
anything else                          ``INTERNAL``            (logged once, with its traceback)
=====================================  ======================  ====================================

Statuses gRPC produces by itself are left alone: an over-size message is ``RESOURCE_EXHAUSTED``, an
expired deadline ``DEADLINE_EXCEEDED``, a call to a server that is draining ``UNAVAILABLE``.

A request message that does not parse (corrupt wire bytes, a ``string`` field that is not UTF-8) is
the caller's error too. gRPC parses a streamed request inside the handler, where :func:`grpc_errors`
sees the ``DecodeError``; it parses a unary request *before* the handler and would answer UNKNOWN, so
:class:`MalformedRequests` (a server interceptor) defers that failure into the handler.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from kvtier.service.server.auth import PermissionDenied, Unauthenticated
from kvtier.service.wire.arena import LeaseExpired, ShmUnavailable
from kvtier.tiering.errors import (BlockNotFound, CapacityExceeded, InvalidBlock, KVTierError, LayoutMismatch,
                            TierUnavailable)

log = logging.getLogger(__name__)

#: Engine error class -> status code, most specific first (SessionNotFound is a BlockNotFound).
_CODES: tuple[tuple[type[KVTierError], grpc.StatusCode], ...] = (
    (InvalidBlock, grpc.StatusCode.INVALID_ARGUMENT),
    (BlockNotFound, grpc.StatusCode.NOT_FOUND),
    (LayoutMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (CapacityExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TierUnavailable, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (ShmUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
    (LeaseExpired, grpc.StatusCode.DEADLINE_EXCEEDED),
)


def _pack(msg) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(msg)
    return detail


def status_for(exc: BaseException) -> grpc.Status:
    """The gRPC status (with ``google.rpc`` details) that answers ``exc``.

    Pure: does not log. Unknown exceptions give ``INTERNAL`` with a generic message, so internals
    never leak to callers.
    """
    if isinstance(exc, DecodeError):
        return rpc_status.to_status(status_pb2.Status(code=code_pb2.INVALID_ARGUMENT,
                                                      message=f"malformed request message: {exc}"))
    code = next((c for cls, c in _CODES if isinstance(exc, cls)), None)
    if code is None:
        return rpc_status.to_status(status_pb2.Status(code=code_pb2.INTERNAL,
                                                      message="internal error; see the server log"))
    message = str(exc) or type(exc).__name__
    details = []
    if isinstance(exc, InvalidBlock):
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=exc.field or "", description=message)])))
    elif isinstance(exc, CapacityExceeded):
        details.append(_pack(error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=getattr(exc, "subject", "kvtier:capacity"),
                                                     description=message)])))
    # grpc.StatusCode values are (int, name) pairs; google.rpc.Status wants the int.
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=details))


def _log_unexpected(name: str, exc: BaseException) -> None:
    log.error("%s failed with an unexpected error; answered INTERNAL", name, exc_info=exc)


def grpc_errors(handler: Callable) -> Callable:
    """Wrap an RPC handler (coroutine or async generator) so errors leave as mapped statuses.

    ``KVTierError`` subclasses are answered as in the module table (logged at DEBUG: they are the
    caller's problem); anything else is logged once at ERROR with its traceback and answered
    ``INTERNAL``. Aborts, cancellations and errors raised by gRPC itself pass through untouched.
    """
    name = handler.__qualname__

    async def answer(context: grpc.aio.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, (KVTierError, DecodeError)):
            log.debug("%s: %s: %s", name, type(exc).__name__, exc)
        else:
            _log_unexpected(name, exc)
        await context.abort_with_status(status_for(exc))

    if inspect.isasyncgenfunction(handler):
        @functools.wraps(handler)
        async def stream_wrapper(self, request, context):
            responses = handler(self, request, context)
            try:
                async for response in responses:
                    yield response
            except (grpc.aio.AbortError, grpc.aio.UsageError):
                raise
            except Exception as exc:  # noqa: BLE001 - the boundary: every error is answered here
                await answer(context, exc)
            finally:
                await responses.aclose()  # run the handler's cleanup now, not at garbage collection
        return stream_wrapper

    @functools.wraps(handler)
    async def unary_wrapper(self, request, context):
        try:
            return await handler(self, request, context)
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary: every error is answered here
            await answer(context, exc)
    return unary_wrapper


class _Malformed:
    """Stands in for a unary request whose bytes did not parse; the handler answers its error."""

    __slots__ = ("error",)

    def __init__(self, error: DecodeError) -> None:
        self.error = error


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Answers an unparsable unary request with INVALID_ARGUMENT instead of gRPC's bare UNKNOWN.

    gRPC calls the request deserializer before the handler, and a ``DecodeError`` there becomes
    UNKNOWN. This interceptor swaps in a deserializer that returns a :class:`_Malformed` placeholder
    and a behavior that aborts on it. Streamed requests are parsed inside the handler, where
    :func:`grpc_errors` maps the error, so their handlers are returned unchanged.
    """

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        method = handler_call_details.method

        def deserializer(raw: bytes):
            try:
                return parse(raw)
            except DecodeError as exc:
                return _Malformed(exc)

        async def reject(request: _Malformed, context: grpc.aio.ServicerContext) -> None:
            log.debug("%s: malformed request: %s", method, request.error)
            await context.abort_with_status(status_for(request.error))

        if handler.unary_unary:
            unary = handler.unary_unary

            async def unary_behavior(request, context):
                if isinstance(request, _Malformed):
                    return await reject(request, context)
                return await unary(request, context)
            return grpc.unary_unary_rpc_method_handler(unary_behavior, request_deserializer=deserializer,
                                                       response_serializer=handler.response_serializer)
        streaming = handler.unary_stream

        async def stream_behavior(request, context):
            if isinstance(request, _Malformed):
                await reject(request, context)
                return
            async for item in streaming(request, context):
                yield item
        return grpc.unary_stream_rpc_method_handler(stream_behavior, request_deserializer=deserializer,
                                                    response_serializer=handler.response_serializer)
