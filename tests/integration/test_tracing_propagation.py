"""Trace context across a real nats-server, store spans against real PostgreSQL, and a real /metrics endpoint."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Iterator

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from services.common.telemetry.chunks import GatewayChunkSpans, WorkerChunkTraces
from services.common.telemetry.db import traced_store
from services.common.telemetry.metrics import WORKERS, metrics_endpoint
from services.common.telemetry.tracing import consumer_span, inject_current, span
from services.scheduler.migrations import migrate
from services.scheduler.store.postgres import PostgresStore
from tests.span_capture import CapturedSpans, captured_spans, ids

pytestmark = pytest.mark.integration


@pytest.fixture
def capture() -> Iterator[CapturedSpans]:
    with captured_spans() as spans:
        yield spans


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[NatsClient]:
    connection = await nats.connect(nats_url)
    yield connection
    await connection.drain()


class _Pending:
    """A session whose next chunk goes into the batch, as the worker's batch loop sees it."""

    def __init__(self, session_id: str, next_seq: int) -> None:
        self.session_id, self.next_seq = session_id, next_seq


async def test_per_seq_chunk_contexts_survive_a_nats_hop_to_the_worker(
    client: NatsClient, capture: CapturedSpans
) -> None:
    received: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_credit(msg: Msg) -> None:
        await received.put(msg)

    await client.subscribe("test.credit", cb=on_credit)
    gateway, worker = GatewayChunkSpans("s1"), WorkerChunkTraces()
    gateway.start_session("tiny")
    await client.publish("test.credit", b"credit", headers=gateway.credit_headers(4, 6, epoch=1, worker_id="w"))
    msg = await asyncio.wait_for(received.get(), 5)
    worker.credited("s1", msg.headers)
    with worker.batch("w", [_Pending("s1", 5)]):
        pass
    gateway.close("closed")
    chunk = next(s for s in capture.named("gateway.chunk") if (s.attributes or {})["chunk.seq"] == 5)
    assert [ids(link.context) for link in capture.one("worker.batch").links] == [ids(chunk.context)]


async def test_a_request_handler_links_to_the_requester_over_nats(client: NatsClient, capture: CapturedSpans) -> None:
    async def handler(msg: Msg) -> None:
        with consumer_span("test.handle", msg.headers):
            await msg.respond(b"ok")

    await client.subscribe("test.request", cb=handler)
    with span("test.ask") as asking:
        assert asking is not None
        await client.request("test.request", b"?", timeout=5, headers=inject_current())
    assert [ids(link.context) for link in capture.one("test.handle").links] == [ids(asking.get_span_context())]


async def test_store_calls_against_postgres_are_spans_named_after_the_operation(
    database_url: str, capture: CapturedSpans
) -> None:
    await migrate(database_url)
    store = traced_store(PostgresStore.connect(database_url))
    try:
        with span("scheduler.sweep"):
            await store.list_workers()
            assert await store.get_session("no-such-session") is None
    finally:
        await store.close()
    sweep = capture.one("scheduler.sweep")
    for name in ("db.list_workers", "db.get_session"):
        assert capture.one(name).parent.span_id == sweep.context.span_id  # type: ignore[union-attr]


def test_the_metrics_endpoint_serves_the_named_series() -> None:
    WORKERS.set(3)
    endpoint_env = {"TURBOSERVE_METRICS_PORT": "0", "TURBOSERVE_METRICS_HOST": "127.0.0.1"}
    with metrics_endpoint("scheduler", endpoint_env) as port:
        assert port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    assert "\nturboserve_workers 3.0\n" in text
    with metrics_endpoint("gateway", {}) as nothing:
        assert nothing is None
