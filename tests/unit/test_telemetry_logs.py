"""Structured log lines: one line per event with the trace, span and session they belong to."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator

import pytest
from opentelemetry import trace

from services.common.telemetry.logs import EventFormatter, bind_session
from services.common.telemetry.tracing import span
from tests.span_capture import CapturedSpans, captured_spans


def record(message: str, *args: object, exc_info: bool = False) -> logging.LogRecord:
    info = sys.exc_info() if exc_info else None
    return logging.LogRecord("turboserve.test", logging.INFO, __file__, 1, message, args, info)


@pytest.fixture
def capture() -> Iterator[CapturedSpans]:
    with captured_spans() as spans:
        yield spans


def test_a_line_outside_any_span_has_the_fixed_fields_then_the_event() -> None:
    line = EventFormatter("gateway").format(record("event=ready port=%d", 8080))
    assert line.startswith("ts=") and line.endswith(" event=ready port=8080")
    assert " level=INFO service=gateway logger=turboserve.test " in line and "trace_id=" not in line


def test_a_line_inside_a_span_carries_its_trace_span_and_session_ids(capture: CapturedSpans) -> None:
    with span("gateway.open", attributes={"session.id": "from-span"}) as current:
        assert current is not None
        context = current.get_span_context()
        from_span = EventFormatter("gateway").format(record("event=session_open"))
        with bind_session("bound"):
            bound = EventFormatter("gateway").format(record("event=session_open"))
    assert f" trace_id={trace.format_trace_id(context.trace_id)} span_id={trace.format_span_id(context.span_id)} " in (
        from_span
    )
    assert " session_id=from-span " in from_span and " session_id=bound " in bound


def test_a_traceback_and_a_multiline_message_stay_on_one_line() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        line = EventFormatter("worker").format(record("event=failed\nsecond line", exc_info=True))
    assert "\n" not in line
    assert "event=failed\\nsecond line" in line and 'exc="Traceback' in line and "RuntimeError: boom" in line
