"""Tracing on, in-process, for one test: spans go to memory instead of OTLP.

OpenTelemetry lets a process set its tracer provider once, so the provider is made on first use and kept; each
test turns the helpers on, and off again afterwards so the next test sees the default (tracing off).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext

from services.common.telemetry.tracing import install, switch

_exporter = InMemorySpanExporter()
_provider: TracerProvider | None = None


def ids(context: SpanContext | None) -> tuple[int, int]:
    """(trace id, span id): what identifies a span, whether the context was made here or read from headers."""
    assert context is not None
    return context.trace_id, context.span_id


class CapturedSpans:
    def __init__(self, exporter: InMemorySpanExporter) -> None:
        self._exporter = exporter

    @property
    def spans(self) -> tuple[ReadableSpan, ...]:
        return self._exporter.get_finished_spans()

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans if s.name == name]

    def one(self, name: str) -> ReadableSpan:
        found = self.named(name)
        assert len(found) == 1, f"{len(found)} spans named {name}; have {[s.name for s in self.spans]}"
        return found[0]


@contextlib.contextmanager
def captured_spans() -> Iterator[CapturedSpans]:
    global _provider
    _exporter.clear()
    if _provider is None:
        _provider = TracerProvider()
        _provider.add_span_processor(SimpleSpanProcessor(_exporter))
        install(_provider)
    switch.enabled = True
    try:
        yield CapturedSpans(_exporter)
    finally:
        switch.enabled = False
        _exporter.clear()
