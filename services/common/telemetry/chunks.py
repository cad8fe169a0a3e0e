"""One trace per chunk, across the gateway and the worker, and the per-batch trace that links to them.

The chunk trace: ``gateway.chunk`` (root; from the credit that asks for the seq to its delivery on the WebSocket)
-> ``worker.chunk`` (its parent context travels in the credit's NATS headers; from the chunk being ready to its
frame published) -> ``gateway.delivery`` (its parent context travels in the chunk frame's headers; from arrival to
the WebSocket send). A batch serves several chunks of different traces, so ``worker.batch`` is a trace of its own
with a *link* to every chunk it served (and each ``worker.chunk`` links back to its batch); the model's forward
pass and the encode are its children.

One credit message may grant several seqs, so it carries one W3C traceparent per seq, in ``ts-chunk-<seq>``
headers. With tracing off every entry point returns at its first line and no header is added.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Protocol

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanContext, SpanKind

from services.common.chunk_frame import peek_header_fields
from services.common.telemetry.logs import bind_session
from services.common.telemetry.sampling import BATCH_ROOT, CHUNK_ROOT
from services.common.telemetry.tracing import (
    context_header,
    extract,
    inject_current,
    switch,
    tracer,
)

CHUNK_HEADER_PREFIX = "ts-chunk-"
_ROOT = Context()
_NO_SPAN = contextlib.nullcontext()


def chunk_header(seq: int) -> str:
    return f"{CHUNK_HEADER_PREFIX}{seq}"


def _now_ns() -> int:
    return time.time_ns()


class GatewayChunkSpans:
    """The gateway's spans of one session: the session span (open to close), a span per control operation,
    and per seq the chunk span and, once the chunk arrived, its delivery span."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self._session: Span | None = None
        self._chunks: dict[int, Span] = {}
        self._deliveries: dict[int, Span] = {}
        self._announced: tuple[str, int, int] = ("", 0, -1)  # (worker, epoch, highest seq) the worker was told

    def start_session(self, model: str) -> None:
        if not switch.enabled or self._session is not None:
            return
        self._session = tracer().start_span(
            "gateway.session", context=_ROOT, kind=SpanKind.SERVER,
            attributes={"session.id": self.session_id, "model": model},
        )

    @contextlib.asynccontextmanager
    async def operation(self, name: str) -> AsyncIterator[None]:
        """A control operation (open, pause, move...) as a child of the session span, current for the block so
        the requests it makes carry it; log lines inside carry the session id either way. Asynchronous only so
        it shares one ``async with`` line with the session's lock."""
        with bind_session(self.session_id):
            if self._session is None:
                yield
                return
            parent = trace.set_span_in_context(self._session)
            with tracer().start_as_current_span(
                f"gateway.{name}", context=parent, attributes={"session.id": self.session_id}
            ):
                yield

    def credit_headers(self, first_seq: int, up_to_seq: int, epoch: int, worker_id: str) -> dict[str, str] | None:
        """Headers for a credit covering ``first_seq..up_to_seq``; starts the chunk span of each new seq. A seq
        already announced to the same worker at the same epoch is not sent again (the worker keeps it), nor is a
        chunk whose trace the sampler dropped: nothing downstream would record it, and most chunks then travel
        without headers, which NATS clients would otherwise build and parse on every message."""
        if self._session is None:
            return None
        if self._announced[:2] == (worker_id, epoch):
            first_seq = max(first_seq, self._announced[2] + 1)
        self._announced = (worker_id, epoch, max(up_to_seq, first_seq - 1))
        headers: dict[str, str] = {}
        session_link = (Link(self._session.get_span_context()),)
        for seq in range(first_seq, up_to_seq + 1):
            chunk = self._chunks.get(seq)
            if chunk is None:
                chunk = self._chunks[seq] = tracer().start_span(
                    CHUNK_ROOT, context=_ROOT, kind=SpanKind.PRODUCER, links=session_link,
                    attributes={"session.id": self.session_id, "chunk.seq": seq, "epoch": epoch,
                                "worker.id": worker_id},
                )
            context = chunk.get_span_context()
            if context.trace_flags.sampled:
                headers[chunk_header(seq)] = context_header(context)
        return headers or None

    def arrived(self, seq: int, headers: Mapping[str, str] | None) -> None:
        """The chunk frame reached the gateway: its delivery span starts under the worker's span."""
        if self._session is None or seq in self._deliveries:
            return
        chunk = self._chunks.get(seq)
        producer = extract(headers)
        if producer is not None:
            parent = trace.set_span_in_context(trace.NonRecordingSpan(producer))
        elif chunk is not None:
            parent = trace.set_span_in_context(chunk)
        else:
            return
        self._deliveries[seq] = tracer().start_span(
            "gateway.delivery", context=parent, kind=SpanKind.CONSUMER,
            attributes={"session.id": self.session_id, "chunk.seq": seq},
        )

    def delivered(self, seq: int) -> None:
        """The WebSocket took the frame: delivery and chunk end together (the chunk's latency as served)."""
        if self._session is None:
            return
        end_ns = _now_ns()
        for spans in (self._deliveries, self._chunks):
            span = spans.pop(seq, None)
            if span is not None:
                span.end(end_time=end_ns)

    def close(self, reason: str) -> None:
        """End every open span; chunks never delivered are marked as such. Idempotent."""
        if self._session is None:
            return
        for spans in (self._deliveries, self._chunks):
            for span in spans.values():
                span.set_attribute("chunk.undelivered", reason)
                span.end()
            spans.clear()
        self._session.set_attribute("session.close_reason", reason)
        self._session.end()
        self._session = None


class PendingChunk(Protocol):
    """What the worker's batch loop knows about a session whose next chunk goes into a batch."""

    session_id: str
    next_seq: int


class WorkerChunkTraces:
    """The worker's side: the gateway's per-seq contexts from credits, kept until the chunk is published
    (bounded: contexts of sessions that left are evicted oldest first)."""

    def __init__(self, max_pending: int = 8192) -> None:
        self._requests: collections.OrderedDict[tuple[str, int], SpanContext] = collections.OrderedDict()
        self._batches: dict[tuple[str, int], SpanContext] = {}
        self._max_pending = max_pending

    def credited(self, session_id: str, headers: Mapping[str, str] | None) -> None:
        if not switch.enabled or not headers:
            return
        for key in headers:
            if not key.startswith(CHUNK_HEADER_PREFIX):
                continue
            context = extract(headers, key)
            seq_text = key[len(CHUNK_HEADER_PREFIX):]
            if context is not None and seq_text.isdigit():
                self._requests[(session_id, int(seq_text))] = context
        while len(self._requests) > self._max_pending:
            stale, _ = self._requests.popitem(last=False)
            self._batches.pop(stale, None)

    def batch(self, worker_id: str, batch: Sequence[PendingChunk]) -> contextlib.AbstractContextManager[object]:
        """The span of one batched step, linked to the chunk request of every session in it."""
        if not switch.enabled:
            return _NO_SPAN
        return self._batch_span(worker_id, batch)

    @contextlib.contextmanager
    def _batch_span(self, worker_id: str, batch: Sequence[PendingChunk]) -> Iterator[Span]:
        keys = [(s.session_id, s.next_seq) for s in batch]
        links = [Link(self._requests[k]) for k in keys if k in self._requests]
        with tracer().start_as_current_span(
            BATCH_ROOT, context=_ROOT, kind=SpanKind.INTERNAL, links=links,
            attributes={"worker.id": worker_id, "batch.size": len(batch)},
        ) as span:
            context = span.get_span_context()
            for key in keys:
                if key in self._requests:
                    self._batches[key] = context
            yield span

    def published(self, session_id: str, frame: bytes) -> dict[str, str] | None:
        """Record the chunk's worker span (ready to published) and return the headers that carry it on."""
        if not switch.enabled:
            return None
        header = peek_header_fields(frame)
        key = (session_id, header["seq"])
        request = self._requests.pop(key, None)
        batch = self._batches.pop(key, None)
        if request is None:
            return None
        timings: dict[str, float] = header["timings_ms"]
        ready_ns = int(timings.get("ready_at_unix_ms", time.time() * 1e3) * 1e6)
        # few attributes: exporting costs more per attribute than recording; model and encode time are on the batch
        attributes: dict[str, str | float] = {
            "session.id": session_id, "chunk.seq": header["seq"], "worker.id": header["worker_id"],
            "queue_ms": timings.get("queue_ms", 0.0),
        }
        span = tracer().start_span(
            "worker.chunk", context=trace.set_span_in_context(trace.NonRecordingSpan(request)),
            kind=SpanKind.CONSUMER, links=[Link(batch)] if batch is not None else None,
            attributes=attributes, start_time=min(ready_ns, _now_ns()),
        )
        with trace.use_span(span, end_on_exit=True):
            return inject_current()


worker_chunk_traces = WorkerChunkTraces()
"""The worker process's one book of chunk contexts: the credit handler fills it, the batch loop and the
publisher read it (like the tracer provider, one per process)."""
