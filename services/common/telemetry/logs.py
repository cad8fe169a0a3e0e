"""Structured logs: one line per event, ``key=value``, each carrying the trace, span and session it belongs to.

The ids make a log line and a trace find each other: ``trace_id`` is the same hex id Jaeger shows. The session id
comes from ``bind_session`` (a context variable, so it follows the asyncio task and the threads it starts), or
failing that from the current span's ``session.id`` attribute. A traceback is folded into the same line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from contextvars import ContextVar

from opentelemetry import trace

LOG_LEVEL_ENV = "TURBOSERVE_LOG_LEVEL"
_session_id: ContextVar[str] = ContextVar("turboserve_session_id", default="")


@contextlib.contextmanager
def bind_session(session_id: str) -> Iterator[None]:
    """Log lines written inside the block carry ``session_id``."""
    token = _session_id.set(session_id)
    try:
        yield
    finally:
        _session_id.reset(token)


def _quoted(value: str) -> str:
    if value and not any(c in value for c in ' "=\n\t'):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'


class EventFormatter(logging.Formatter):
    """``ts level service logger trace_id span_id session_id`` then the message, which in our code is itself
    ``event=... key=value`` text."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        fields = [
            f"ts={time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(record.created))}.{int(record.msecs):03d}Z",
            f"level={record.levelname}", f"service={self.service}", f"logger={record.name}",
        ]
        current = trace.get_current_span()
        span_context = current.get_span_context()
        if span_context.is_valid:
            fields.append(f"trace_id={trace.format_trace_id(span_context.trace_id)}")
            fields.append(f"span_id={trace.format_span_id(span_context.span_id)}")
        session_id = _session_id.get() or _span_session_id(current)
        if session_id:
            fields.append(f"session_id={_quoted(session_id)}")
        fields.append(record.getMessage().replace("\n", "\\n"))
        if record.exc_info:
            fields.append(f"exc={_quoted(self.formatException(record.exc_info))}")
        return " ".join(fields)


def _span_session_id(span: trace.Span) -> str:
    attributes = getattr(span, "attributes", None)  # SDK spans have them; the API's non-recording spans do not
    value = attributes.get("session.id") if attributes else None
    return value if isinstance(value, str) else ""


def configure_logging(service: str, level: str | None = None) -> None:
    """Route every logger's records through one stderr handler with the event format."""
    handler = logging.StreamHandler()
    handler.setFormatter(EventFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get(LOG_LEVEL_ENV, "INFO"))
