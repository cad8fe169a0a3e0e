"""OpenTelemetry tracing for every service: set up from the environment, off by default, and the W3C trace
context carried in NATS message headers.

Off (the default; ``TURBOSERVE_TRACING=1`` turns it on) means no SDK provider is installed and every helper here
returns before touching OpenTelemetry, so the chunk path pays one boolean test. On, spans go by OTLP with the
exporter configured by the standard ``OTEL_*`` variables (endpoint, protocol, headers, ``OTEL_BSP_*`` batching,
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``); ``OTEL_TRACES_EXPORTER=none`` records spans, exports none.
Per-chunk traces are sampled (``sampling``: a tenth by default), every other trace is kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger("turboserve.telemetry")

TRACING_ENV = "TURBOSERVE_TRACING"
TRACER_NAME = "turboserve"
_PROPAGATOR = TraceContextTextMapPropagator()
_TRACEPARENT = "traceparent"
_NO_SPAN = contextlib.nullcontext()


class _Switch:
    """Whether this process traces, and its tracer (looked up once: the lookup costs more than a span); set only
    by ``install`` (``tracing_from_env``, and tests that install an in-memory provider)."""

    enabled = False
    tracer: Tracer = trace.get_tracer(TRACER_NAME)


switch = _Switch()
_cause_links: ContextVar[tuple[Link, ...]] = ContextVar("turboserve_cause_links", default=())


def tracing_requested(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get(TRACING_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def tracing_from_env(service: str) -> Iterator[bool]:
    """Install an SDK tracer provider when tracing is requested; on exit flush what is buffered and shut it
    down. Yields whether tracing is on. The SDK is imported only when it is needed. Reads ``os.environ`` itself,
    as the exporter it configures does, so the two cannot disagree."""
    environ = os.environ
    if not tracing_requested(environ):
        yield False
        return
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from services.common.telemetry.sampling import sampler_from_env

    name = environ.get("OTEL_SERVICE_NAME") or f"turboserve-{service}"
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}), sampler=sampler_from_env(environ))
    exporter_name = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if exporter_name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter,
        )

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif exporter_name != "none":
        raise ValueError(f"OTEL_TRACES_EXPORTER={exporter_name!r}: TurboServe exports by otlp (or none)")
    install(provider)
    log.info("event=tracing_on service_name=%s exporter=%s sampler=%s", name, exporter_name,
             provider.sampler.get_description())
    try:
        yield True
    finally:
        provider.shutdown()
        switch.enabled = False


def install(provider: trace.TracerProvider) -> None:
    """Make ``provider`` this process's tracer provider and turn the helpers on (tests pass in-memory ones)."""
    trace.set_tracer_provider(provider)
    switch.tracer = provider.get_tracer(TRACER_NAME)
    switch.enabled = True


def tracer() -> Tracer:
    return switch.tracer


def span(
    name: str, *, kind: SpanKind = SpanKind.INTERNAL, attributes: Mapping[str, str | float] | None = None
) -> contextlib.AbstractContextManager[Span | None]:
    """A child of the current span, made current for the block; a shared no-op when tracing is off."""
    if not switch.enabled:
        return _NO_SPAN
    return tracer().start_as_current_span(name, kind=kind, attributes=attributes)


@contextlib.contextmanager
def consumer_span(name: str, headers: Mapping[str, str] | None, **attributes: str | float) -> Iterator[None]:
    """A new trace for handling one NATS message, *linked* to the sender's context (not its child: one
    message may cause work that outlives the sender's span). Decisions made inside carry the same link."""
    if not switch.enabled:
        yield
        return
    cause = extract(headers)
    with linked_span(name, (Link(cause),) if cause is not None else (), kind=SpanKind.CONSUMER, **attributes):
        yield


@contextlib.contextmanager
def linked_span(
    name: str, links: Sequence[Link], *, kind: SpanKind = SpanKind.INTERNAL, **attributes: str | float
) -> Iterator[None]:
    """A new trace linked to ``links``: work done for several causes at once (one control-loop round answers
    every request that waited for it). Decisions made inside carry the same links."""
    if not switch.enabled:
        yield
        return
    with tracer().start_as_current_span(name, context=Context(), kind=kind, links=links, attributes=attributes):
        token = _cause_links.set(tuple(links))
        try:
            yield
        finally:
            _cause_links.reset(token)


def request_links() -> tuple[Link, ...]:
    """Links to the work in progress (the current span and what caused it), to hand to work done later for it."""
    if not switch.enabled:
        return ()
    current = trace.get_current_span().get_span_context()
    own = (Link(current),) if current.is_valid else ()
    return own + _cause_links.get()


def record_decision(
    decision: str, reason: str, *, session_id: str | None = None, links: Sequence[Link] | None = None,
    **attributes: object,
) -> None:
    """A finished decision as a zero-length child span, reason attached and linked to the message that caused
    it, so an operator finds why a session went where it went from the request's trace. None values are left
    out; values other than str, int and float are recorded as text. ``links`` replaces the current causes (a
    decision made in a shared round for one request links to that request)."""
    if not switch.enabled:
        return
    values: dict[str, str | int | float] = {
        f"decision.{name}": value if isinstance(value, (str, int, float)) else str(value)
        for name, value in attributes.items()
        if value is not None
    }
    values.update({"decision": decision, "decision.reason": reason})
    if session_id is not None:
        values["session.id"] = session_id
    chosen = _cause_links.get() if links is None else links
    tracer().start_span(f"decision.{decision}", links=chosen, attributes=values).end()


def inject_current() -> dict[str, str] | None:
    """Headers carrying the current span's context, or None (no headers at all) when tracing is off."""
    if not switch.enabled:
        return None
    headers: dict[str, str] = {}
    _PROPAGATOR.inject(headers)
    return headers or None


def context_header(span_context: trace.SpanContext) -> str:
    """The W3C traceparent of one span, for headers that carry several contexts (one per chunk seq)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(trace.NonRecordingSpan(span_context)))
    return carrier[_TRACEPARENT]


def extract(headers: Mapping[str, str] | None, key: str = _TRACEPARENT) -> trace.SpanContext | None:
    """The sender's span context from ``headers[key]`` (a W3C traceparent), or None if absent or malformed."""
    if not headers or key not in headers:
        return None
    context = _PROPAGATOR.extract({_TRACEPARENT: headers[key]})
    span_context = trace.get_current_span(context).get_span_context()
    return span_context if span_context.is_valid else None


def otlp_export_env(endpoint: str) -> dict[str, str]:
    """The environment that turns tracing on in a service and exports to ``endpoint`` by OTLP/HTTP: the standard
    variables a Jaeger or collector deployment sets (docker-compose.yml sets the same)."""
    return {
        TRACING_ENV: "1", "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
    }
