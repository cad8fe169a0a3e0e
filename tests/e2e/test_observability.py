"""Observability through the real processes: one trace per chunk from the gateway to the worker and back, the
scheduler's decision spans, and the Prometheus series each service exposes after a short stream."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from services.client import TurboServeClient
from tests.e2e.conftest import TOKENS, start_when_workers_registered
from tests.e2e.observed_system import ObservedSystem, Sample, observed_system
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHUNKS_PER_SESSION = 4


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def traced(nats_url: str, database_url: str, receiver: OtlpReceiver) -> Iterator[ObservedSystem]:
    with observed_system(nats_url, database_url, receiver.endpoint) as running:
        yield running


@pytest.fixture(scope="module")
async def streamed(traced: ObservedSystem) -> list[str]:
    """Two concurrent sessions (so batches coalesce), a few chunks each, then closed; their session ids."""

    async def one(seed: int) -> str:
        client = await TurboServeClient.connect(traced.ws_url, TOKENS[0])
        try:
            started = await start_when_workers_registered(client, f"observed stream {seed}", seed)
            session_id = str(started["session_id"])
            for _ in range(CHUNKS_PER_SESSION):
                await client.next_chunk(session_id)
            await client.close_session(session_id)
            return session_id
        finally:
            await client.close()

    return list(await asyncio.gather(one(1), one(2)))


def by_name(spans: list[ReceivedSpan], name: str, **attributes: object) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == name and all(s.attributes.get(k) == v for k, v in attributes.items())]


def only(spans: list[ReceivedSpan], name: str, **attributes: object) -> ReceivedSpan:
    found = by_name(spans, name, **attributes)
    assert len(found) == 1, f"{len(found)} spans {name} {attributes}; names seen: {sorted({s.name for s in spans})}"
    return found[0]


async def test_a_chunk_trace_runs_gateway_to_worker_to_gateway_with_parents_and_links(
    receiver: OtlpReceiver, streamed: list[str]
) -> None:
    session_id, seq = streamed[0], 2

    def complete(spans: list[ReceivedSpan]) -> bool:
        """Every span asserted on below has arrived: each process exports on its own schedule."""
        of_chunk = {"session.id": session_id, "chunk.seq": seq}
        if not all(by_name(spans, name, **of_chunk) for name in ("gateway.chunk", "worker.chunk", "gateway.delivery")):
            return False
        if not by_name(spans, "gateway.session", **{"session.id": session_id}):
            return False
        if not by_name(spans, "scheduler.open_session"):
            return False
        batch_ids = set(by_name(spans, "worker.chunk", **of_chunk)[0].links)
        batch_children = {s.name for s in spans if (s.trace_id, s.parent_span_id) in batch_ids}
        batch_arrived = any((s.trace_id, s.span_id) in batch_ids for s in spans)
        return batch_arrived and {"model.forward", "encode"} <= batch_children

    spans = await asyncio.to_thread(receiver.wait_for, complete, 20.0)
    chunk = only(spans, "gateway.chunk", **{"session.id": session_id, "chunk.seq": seq})
    work = only(spans, "worker.chunk", **{"session.id": session_id, "chunk.seq": seq})
    delivery = only(spans, "gateway.delivery", **{"session.id": session_id, "chunk.seq": seq})
    session = only(spans, "gateway.session", **{"session.id": session_id})

    assert (chunk.service, work.service, delivery.service) == ("turboserve-gateway", "turboserve-worker",
                                                                "turboserve-gateway")
    assert chunk.parent_span_id == "" and chunk.trace_id == work.trace_id == delivery.trace_id
    assert work.parent_span_id == chunk.span_id, "the worker's span is a child of the gateway's chunk span"
    assert delivery.parent_span_id == work.span_id, "delivery continues from the worker's span"
    assert (session.trace_id, session.span_id) in chunk.links
    assert chunk.start_ns <= work.start_ns <= work.end_ns <= delivery.end_ns <= chunk.end_ns

    (batch_link,) = work.links
    batch = next(s for s in spans if (s.trace_id, s.span_id) == batch_link)
    assert batch.name == "worker.batch" and (chunk.trace_id, chunk.span_id) in batch.links
    children = {s.name for s in spans if s.trace_id == batch.trace_id and s.parent_span_id == batch.span_id}
    assert {"model.forward", "encode"} <= children
    batches = by_name(spans, "worker.batch")
    assert all(len(b.links) == b.attributes["batch.size"] for b in batches), "a batch links every chunk it served"


async def test_scheduler_decisions_are_spans_with_their_reason_linked_to_the_request(
    receiver: OtlpReceiver, streamed: list[str]
) -> None:
    session_id = streamed[0]
    spans = await asyncio.to_thread(
        receiver.wait_for, lambda s: bool(by_name(s, "decision.close", **{"session.id": session_id})), 20.0
    )
    opened = only(spans, "gateway.open", **{"session.id": session_id})
    place = only(spans, "decision.place", **{"session.id": session_id})
    handler = next(s for s in spans if s.name == "scheduler.open_session" and (opened.trace_id, opened.span_id)
                   in s.links)
    assert handler.service == "turboserve-scheduler"
    round_ = next(s for s in spans if s.span_id == place.parent_span_id)  # the control-loop round that placed it
    assert round_.name == "scheduler.plan"  # linked to the requests waiting when it began; this one may have come later
    assert (opened.trace_id, opened.span_id) in place.links and (handler.trace_id, handler.span_id) in place.links
    assert place.attributes["decision.reason"] and place.attributes["decision.worker"] == "worker-1"
    database = {s.name for s in spans if s.trace_id == handler.trace_id and s.parent_span_id == handler.span_id}
    assert "db.insert_session" in database
    placing = {s.name for s in spans if s.trace_id == round_.trace_id and s.parent_span_id == round_.span_id}
    assert {"db.list_sessions", "db.move_session"} <= placing


def value(samples: list[Sample], name: str, **labels: str) -> float:
    matching = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert matching, f"no {name}{labels} among {sorted({s.name for s in samples})}"
    return sum(matching)


async def test_metrics_endpoints_expose_the_named_series_with_plausible_values(
    traced: ObservedSystem, streamed: list[str]
) -> None:
    worker = await asyncio.to_thread(traced.scrape, "worker-1")
    chunks = value(worker, "turboserve_chunk_latency_seconds_count", worker="worker-1", model="tiny")
    assert chunks >= 2 * CHUNKS_PER_SESSION
    mean_latency_s = value(worker, "turboserve_chunk_latency_seconds_sum", worker="worker-1") / chunks
    assert 0.001 < mean_latency_s < 10.0
    batches = value(worker, "turboserve_batch_size_count", worker="worker-1")
    assert 1 <= batches <= chunks
    assert 1.0 <= value(worker, "turboserve_batch_size_sum", worker="worker-1") / batches <= 2.0
    assert value(worker, "turboserve_queue_wait_seconds_count", worker="worker-1") == chunks
    for state in ("active", "idle", "offloaded"):
        assert value(worker, "turboserve_sessions", worker="worker-1", state=state) >= 0

    scheduler = await asyncio.to_thread(traced.scrape, "scheduler")
    assert value(scheduler, "turboserve_workers") == 1
    gateway = await asyncio.to_thread(traced.scrape, "gateway")
    assert value(gateway, "turboserve_websocket_connections") == 0, "every client closed its connection"


async def test_log_lines_carry_trace_and_session_ids(traced: ObservedSystem, streamed: list[str]) -> None:
    gateway_log = traced.child("gateway").log_path.read_text()
    lines = [line for line in gateway_log.splitlines() if f"session_id={streamed[0]}" in line]
    assert lines, "no gateway log line names the session"
    assert any(" trace_id=" in line and " span_id=" in line for line in lines)
