"""Tracing setup and propagation: off by default and free, W3C context through headers, message handlers as
linked traces, decisions as spans with their reason, store calls as spans."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from opentelemetry import trace

from services.common.telemetry.db import traced_store
from services.common.telemetry.tracing import (
    consumer_span,
    extract,
    inject_current,
    record_decision,
    span,
    switch,
    tracing_from_env,
    tracing_requested,
)
from tests.span_capture import CapturedSpans, captured_spans, ids


@pytest.fixture
def capture() -> Iterator[CapturedSpans]:
    with captured_spans() as spans:
        yield spans


class FakeStore:
    label = "fake"

    async def get_session(self, session_id: str) -> str:
        return f"record {session_id}"

    async def move_session(self, session_id: str) -> None:
        raise LookupError(session_id)

    def plain(self) -> int:
        return 7


def test_tracing_is_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not tracing_requested({})
    assert tracing_requested({"TURBOSERVE_TRACING": "1"}) and not tracing_requested({"TURBOSERVE_TRACING": "0"})
    monkeypatch.delenv("TURBOSERVE_TRACING", raising=False)
    with tracing_from_env("gateway") as on:
        assert on is False and not switch.enabled


def test_with_tracing_off_the_helpers_return_shared_no_ops() -> None:
    assert span("a") is span("b")
    assert inject_current() is None
    store = FakeStore()
    assert traced_store(store) is store
    with consumer_span("handler", {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}):
        assert not trace.get_current_span().get_span_context().is_valid


def test_an_unknown_exporter_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURBOSERVE_TRACING", "1")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER='zipkin'"), tracing_from_env("gateway"):
        pass


def test_the_current_context_round_trips_through_headers(capture: CapturedSpans) -> None:
    with span("sender") as sender:
        headers = inject_current()
    assert headers is not None and sender is not None
    assert ids(extract(headers)) == ids(sender.get_span_context())
    assert extract({"traceparent": "not-a-context"}) is None and extract(None) is None


def test_a_handled_message_starts_a_linked_trace_and_its_decisions_carry_reason_and_link(
    capture: CapturedSpans,
) -> None:
    with span("gateway.open"):
        headers = inject_current()
    with consumer_span("scheduler.open_session", headers, subject="ts.sched.open"):
        record_decision("place", "lightest worker", session_id="s1", worker="w1", epoch=1, missing=None)
    sender, handler, decision = (capture.one(n) for n in ("gateway.open", "scheduler.open_session", "decision.place"))
    assert handler.parent is None and handler.context.trace_id != sender.context.trace_id
    assert [ids(link.context) for link in handler.links] == [ids(sender.context)]
    assert decision.parent is not None and decision.parent.span_id == handler.context.span_id
    assert [ids(link.context) for link in decision.links] == [ids(sender.context)]
    assert dict(decision.attributes or {}) == {
        "decision": "place", "decision.reason": "lightest worker", "session.id": "s1", "decision.worker": "w1",
        "decision.epoch": 1,
    }


async def test_store_calls_become_client_spans_and_failures_are_marked(capture: CapturedSpans) -> None:
    store = traced_store(FakeStore())
    assert await store.get_session("s1") == "record s1"
    assert store.plain() == 7 and store.label == "fake"
    with contextlib.suppress(LookupError):
        await store.move_session("s1")
    read, move = capture.one("db.get_session"), capture.one("db.move_session")
    assert read.kind == trace.SpanKind.CLIENT and (read.attributes or {})["db.system"] == "postgresql"
    assert read.status.status_code == trace.StatusCode.UNSET and move.status.status_code == trace.StatusCode.ERROR
