"""Log output of the kvtier processes: one stderr handler, text or JSON lines, each carrying the current
trace's ``trace_id`` and ``span_id``. Imports only the OpenTelemetry API (no SDK, no exporters).

Text lines look like ``2026-01-02 03:04:05,678 INFO kvtier.x [trace_id=… span_id=…] message``; JSON
lines are one object each: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, ``trace_id``,
``span_id`` and, when an exception is logged, ``exception`` (its formatted traceback). Outside a span
both ids are zeros. Messages are whatever the code logged: the house rule keeps payloads, token ids
and secrets out of them.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

from opentelemetry import trace

#: Text log format with trace correlation (needs :class:`TraceContextFilter` on the handler).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [trace_id=%(trace_id)s span_id=%(span_id)s] %(message)s"
#: Values of ``log_format`` / ``--log-format``.
LOG_FORMATS = ("text", "json")


class TraceContextFilter(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` (lower-case hex; zeros outside a span) to every record.

    Attach it to a *handler* (handler filters see records propagated from every logger).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        record.trace_id = format(ctx.trace_id, "032x")
        record.span_id = format(ctx.span_id, "016x")
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record (module docstring); needs :class:`TraceContextFilter` on the handler."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname, "logger": record.name, "message": record.getMessage(),
               "trace_id": getattr(record, "trace_id", "0" * 32), "span_id": getattr(record, "span_id", "0" * 16)}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str, fmt: str = "text") -> None:
    """Send every logger's records to stderr, ``level`` and up (any case), as ``fmt`` lines.

    :param level: ``DEBUG``, ``INFO``, ``WARNING``, ``ERROR`` or ``CRITICAL`` in any case.
    :param fmt: ``text`` or ``json`` (any case).
    :raises ValueError: on an unknown level or format.
    """
    fmt = fmt.lower()
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(LOG_FORMAT))
    handler.addFilter(TraceContextFilter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
