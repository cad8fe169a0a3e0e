"""The closed loop scaling real worker processes: the scheduler's local provisioner starts workers when load
rises and drains then stops them when it falls, while the clients' streams go on with no gap or duplicate."""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from collections.abc import Iterator

import psycopg
import pytest

from services.client import ReceivedChunk, TurboServeClient
from tests.e2e.conftest import (
    TOKENS,
    RunningSystem,
    running_system,
    start_when_workers_registered,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CAPACITY = 4
SCALE_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def elastic(nats_url: str, database_url: str) -> Iterator[RunningSystem]:
    """One worker to start with, at most three, K = 4; fast decisions, a short scale-in hold, and no warm spare,
    so that one active session scales the pool in to one worker. Workers are stopped here, never frozen, so
    nothing waits on the heartbeat timeout, and it is longer than the other modules' 1.5 s: a serving worker
    stalled that long while two more start on a 2-core CI machine would send the first sessions elsewhere."""
    settings = {
        "TURBOSERVE_WORKER_TIMEOUT_S": "5", "TURBOSERVE_WORKER_CAPACITY": str(CAPACITY),
        "TURBOSERVE_SNAPSHOT_EVERY_CHUNKS": "4",
        "TURBOSERVE_OFFLOAD_AFTER_S": "2", "TURBOSERVE_PROVISIONER": "local", "TURBOSERVE_MIN_GPUS": "1",
        "TURBOSERVE_MAX_GPUS": "3", "TURBOSERVE_CONTROL_PERIOD_S": "0.5", "TURBOSERVE_SCALE_IN_HOLD_S": "2",
        "TURBOSERVE_DETECTOR_WINDOW_S": "10",
        "TURBOSERVE_BURST_COVERAGE": "0.5", "TURBOSERVE_PROVISIONING_DELAY_S": "5", "TURBOSERVE_SPARE_GPUS": "0",
    }
    with running_system(nats_url, database_url, workers=1, settings=settings) as running:
        yield running


async def live_workers(database_url: str) -> set[str]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        rows = await (await conn.execute("select id from workers where status = 'live'")).fetchall()
    return {row[0] for row in rows}


async def until_live_workers(database_url: str, *, at_least: int = 0, at_most: int = 1 << 30) -> set[str]:
    """Polls PostgreSQL (the scheduler's own record of liveness) until the live worker count is in bounds."""
    deadline = time.monotonic() + SCALE_TIMEOUT_S
    while time.monotonic() < deadline:
        live = await live_workers(database_url)
        if at_least <= len(live) <= at_most:
            return live
        await asyncio.sleep(0.2)
    live = await live_workers(database_url)
    raise AssertionError(f"not {at_least}..{at_most} live workers in {SCALE_TIMEOUT_S} s: {sorted(live)}")


def drain_queue(client: TurboServeClient, session_id: str) -> list[ReceivedChunk]:
    return [client._routes.chunks[session_id].get_nowait() for _ in range(client.pending_chunks(session_id))]


def assert_consecutive(chunks: list[ReceivedChunk], first: int, label: str) -> None:
    seqs = [c.header.seq for c in chunks]
    assert seqs == list(range(first, first + len(seqs))), f"{label}: gap, duplicate or reorder in {seqs}"


async def test_rising_load_adds_workers_that_take_sessions_and_falling_load_stops_them_dropping_nothing(
    elastic: RunningSystem,
) -> None:
    clients = [await TurboServeClient.connect(elastic.ws_url, TOKENS[i % 2]) for i in range(3)]
    paused_client, streaming_client, others = clients
    try:
        paused = str((await start_when_workers_registered(paused_client, "a harbour at dawn", 11))["session_id"])
        others_ids = [str((await start_when_workers_registered(others, f"scene {i}", i))["session_id"])
                      for i in range(3)]
        first = {sid: await paused_client.next_chunk(sid) if sid == paused else await others.next_chunk(sid)
                 for sid in [paused, *others_ids]}
        assert {c.header.worker_id for c in first.values()} == {"worker-1"}

        grown = await until_live_workers(elastic.database_url, at_least=2)  # 4 active of K = 4: headroom wanted
        streaming = str((await start_when_workers_registered(streaming_client, "a kite over dunes", 5))["session_id"])
        stream = [await streaming_client.next_chunk(streaming) for _ in range(3)]
        for sid in others_ids:  # what was queued may predate a rebalancing move: look at fresh chunks only
            drain_queue(others, sid)
        serving = {c.header.worker_id for c in stream} | {
            (await others.next_chunk(sid)).header.worker_id for sid in others_ids
        }  # 5 active sessions, K = 4: at least one is served by a worker the loop added
        assert serving - {"worker-1"}, f"no added worker serves a session: {serving}"

        for sid in others_ids:
            await others.close_session(sid)
        stops_at = int((await paused_client.pause(paused))["next_seq"])
        before_pause = [first[paused], *[await paused_client.next_chunk(paused) for _ in range(stops_at - 1)]]

        remaining = await until_live_workers(elastic.database_url, at_most=1)  # 1 active: scale in to one worker
        stream += drain_queue(streaming_client, streaming)
        stream += [await streaming_client.next_chunk(streaming) for _ in range(3)]
        assert_consecutive(stream, 0, "streaming session through the scale-in")
        assert stream[-1].header.worker_id in remaining

        assert (await paused_client.resume(paused))["reason"] == "resumed"
        after = [await paused_client.next_chunk(paused) for _ in range(3)]
        assert_consecutive(before_pause + after, 0, "paused session resumed after its worker was stopped")
        assert after[-1].header.worker_id in remaining
        for client, sid in ((paused_client, paused), (streaming_client, streaming)):
            await client.close_session(sid)
    finally:
        for client in clients:
            await client.close()
    log = elastic.child("scheduler").log_path.read_text(errors="replace")
    decide_ms = [float(v) for v in re.findall(r"event=plan trigger=\S+ decide_ms=([\d.]+)", log)]
    print(f"\nplans: {len(decide_ms)}, decide_ms median {statistics.median(decide_ms):.3f} "
          f"p99 {statistics.quantiles(decide_ms, n=100, method='inclusive')[98]:.3f} max {max(decide_ms):.3f}; added "
          f"{sorted(grown - {'worker-1'})}; left {sorted(remaining)}")
