"""The chunk trace protocol in one process: gateway credit -> worker batch and chunk -> gateway delivery, with
the contexts passed only through the headers dicts NATS would carry."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from opentelemetry.sdk.trace import ReadableSpan

from services.common.chunk_frame import ChunkHeader, pack_chunk
from services.common.telemetry.chunks import (
    GatewayChunkSpans,
    WorkerChunkTraces,
    chunk_header,
)
from services.common.telemetry.tracing import span
from tests.span_capture import CapturedSpans, captured_spans, ids


@dataclass
class Pending:
    session_id: str
    next_seq: int


def frame(session_id: str, seq: int) -> bytes:
    header = ChunkHeader(
        session_id=session_id, epoch=1, seq=seq, first_frame=seq * 12, width=8, height=8, frame_sizes=(3,),
        timings_ms={"ready_at_unix_ms": time.time() * 1e3 - 5.0, "queue_ms": 1.0, "model_ms": 3.0},
        worker_id="worker-a",
    )
    return pack_chunk(header, [b"abc"])


@pytest.fixture
def capture() -> Iterator[CapturedSpans]:
    with captured_spans() as spans:
        yield spans


def chunk_span(capture: CapturedSpans, name: str, seq: int) -> ReadableSpan:
    (found,) = [s for s in capture.named(name) if s.attributes and s.attributes["chunk.seq"] == seq]
    return found


async def test_one_credit_carries_a_context_per_seq_and_the_chunk_trace_runs_through_the_worker_and_back(
    capture: CapturedSpans,
) -> None:
    gateway, worker = GatewayChunkSpans("s1"), WorkerChunkTraces()
    gateway.start_session("tiny")
    credit = gateway.credit_headers(0, 1, epoch=1, worker_id="worker-a")
    assert credit is not None and set(credit) == {chunk_header(0), chunk_header(1)}

    worker.credited("s1", credit)
    with worker.batch("worker-a", [Pending("s1", 0), Pending("other", 7)]), span("model.forward"):
        pass
    published = worker.published("s1", frame("s1", 0))
    gateway.arrived(0, published)
    gateway.delivered(0)
    gateway.close("closed")

    chunk, work = chunk_span(capture, "gateway.chunk", 0), chunk_span(capture, "worker.chunk", 0)
    delivery, batch = chunk_span(capture, "gateway.delivery", 0), capture.one("worker.batch")
    assert chunk.parent is None and work.parent is not None and delivery.parent is not None
    assert work.parent.span_id == chunk.context.span_id and delivery.parent.span_id == work.context.span_id
    assert chunk.context.trace_id == work.context.trace_id == delivery.context.trace_id
    assert [ids(link.context) for link in batch.links] == [ids(chunk.context)], "the unknown session adds no link"
    assert [ids(link.context) for link in work.links] == [ids(batch.context)]
    assert capture.one("model.forward").parent.span_id == batch.context.span_id  # type: ignore[union-attr]
    assert [ids(link.context) for link in chunk.links] == [ids(capture.one("gateway.session").context)]
    assert chunk_span(capture, "gateway.chunk", 1).attributes["chunk.undelivered"] == "closed"  # type: ignore[index]


async def test_a_credit_to_the_same_worker_announces_only_the_seqs_it_has_not_heard_of(
    capture: CapturedSpans,
) -> None:
    gateway = GatewayChunkSpans("s1")
    gateway.start_session("tiny")
    assert set(gateway.credit_headers(0, 1, epoch=1, worker_id="worker-a") or {}) == {chunk_header(0), chunk_header(1)}
    assert set(gateway.credit_headers(1, 2, epoch=1, worker_id="worker-a") or {}) == {chunk_header(2)}
    assert gateway.credit_headers(2, 2, epoch=1, worker_id="worker-a") is None
    gateway.close("closed")


async def test_a_move_announces_the_open_chunk_spans_again_to_the_new_worker(capture: CapturedSpans) -> None:
    gateway = GatewayChunkSpans("s1")
    gateway.start_session("tiny")
    first = gateway.credit_headers(0, 1, epoch=1, worker_id="worker-a")
    again = gateway.credit_headers(0, 2, epoch=2, worker_id="worker-b")  # moved: same chunks, new worker
    assert first is not None and again is not None
    assert again[chunk_header(0)] == first[chunk_header(0)] and chunk_header(2) in again
    gateway.close("closed")


async def test_the_worker_forgets_the_oldest_contexts_beyond_its_bound(capture: CapturedSpans) -> None:
    gateway, worker = GatewayChunkSpans("s1"), WorkerChunkTraces(max_pending=2)
    gateway.start_session("tiny")
    worker.credited("s1", gateway.credit_headers(0, 2, epoch=1, worker_id="worker-a"))
    assert worker.published("s1", frame("s1", 0)) is None
    assert worker.published("s1", frame("s1", 2)) is not None
    gateway.close("closed")


def test_with_tracing_off_nothing_is_recorded_and_no_header_is_added() -> None:
    gateway, worker = GatewayChunkSpans("s1"), WorkerChunkTraces()
    gateway.start_session("tiny")
    assert gateway.credit_headers(0, 3, epoch=1, worker_id="worker-a") is None
    worker.credited("s1", {chunk_header(0): "00-" + "1" * 32 + "-" + "2" * 16 + "-01"})
    with worker.batch("worker-a", [Pending("s1", 0)]) as batch:
        assert batch is None
    assert worker.published("s1", frame("s1", 0)) is None
    gateway.arrived(0, None)
    gateway.delivered(0)
