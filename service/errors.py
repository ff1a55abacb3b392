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
``CapacityExceeded``                   ``RESOURCE_EXHAUSTED``  ``QuotaFailure``
``TierUnavailable``                    ``UNAVAILABLE``
anything else                          ``INTERNAL``            (logged once, with its traceback)
=====================================  ======================  ====================================

Statuses gRPC produces by itself are left alone: an over-size message is ``RESOURCE_EXHAUSTED``, an
expired deadline ``DEADLINE_EXCEEDED``, a call to a server that is draining ``UNAVAILABLE``.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tiering.errors import (BlockNotFound, CapacityExceeded, InvalidBlock, KVTierError, LayoutMismatch,
                            TierUnavailable)

log = logging.getLogger(__name__)

#: Engine error class -> status code, most specific first (SessionNotFound is a BlockNotFound).
_CODES: tuple[tuple[type[KVTierError], grpc.StatusCode], ...] = (
    (InvalidBlock, grpc.StatusCode.INVALID_ARGUMENT),
    (BlockNotFound, grpc.StatusCode.NOT_FOUND),
    (LayoutMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (CapacityExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TierUnavailable, grpc.StatusCode.UNAVAILABLE),
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
            error_details_pb2.QuotaFailure.Violation(subject="kvtier:capacity", description=message)])))
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
        if isinstance(exc, KVTierError):
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
