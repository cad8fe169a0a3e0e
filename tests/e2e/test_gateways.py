"""Sessions belong to the system, not to a gateway: two gateways on one system, a client that reconnects through
the other one continues at exactly its next seq, the per-token limit holds across both, and a kill -9 of a
gateway mid-stream loses nothing. The gateway kill runs last in this module: it leaves one gateway standing."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator

import numpy as np
import psycopg
import pytest

from services.client import ReceivedChunk, ServerError, TurboServeClient
from tests.e2e.conftest import (
    TOKENS,
    RunningSystem,
    assert_same_frames,
    decoded,
    receive,
    running_system,
    start_when_workers_registered,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


LEASE_S, LINGER_S = 1.5, 3.0


@pytest.fixture(scope="module")
def two_gateways(nats_url: str, database_url: str) -> Iterator[RunningSystem]:
    settings = {"TURBOSERVE_LEASE_S": str(LEASE_S), "TURBOSERVE_LINGER_S": str(LINGER_S)}
    with running_system(nats_url, database_url, workers=2, gateways=2, settings=settings) as running:
        yield running


async def let_go_by_gateway_1(system: RunningSystem, session_id: str, timeout_s: float = 10.0) -> None:
    """Gateway 1 dropped its copy because gateway 2 took the session over, not because its linger ran out (it
    would have received and fenced off the session's chunks until then)."""
    log = system.log_dir / "gateway.log"
    deadline = time.monotonic() + timeout_s
    while True:
        closed = [line for line in log.read_text(errors="replace").splitlines()
                  if f"session_id={session_id}" in line and "event=session_closed" in line]
        if closed:
            assert "taken over by gateway" in closed[0], closed[0]
            return
        assert time.monotonic() < deadline, f"gateway 1 still holds {session_id} after {timeout_s:g} s"
        await asyncio.sleep(0.05)


def session_row(system: RunningSystem, session_id: str) -> tuple[str, str | None] | None:
    with psycopg.connect(system.database_url) as conn:
        row = conn.execute("select status, worker_id from sessions where id = %s", (session_id,)).fetchone()
    return None if row is None else (row[0], row[1])


async def reference_frames(url: str, prompt: str, seed: int, count: int) -> np.ndarray:
    """An undisturbed run of the same session: what every disturbed one must reproduce exactly."""
    client = await TurboServeClient.connect(url, TOKENS[1])
    try:
        started = await start_when_workers_registered(client, prompt, seed)
        session_id = str(started["session_id"])
        chunks = await receive(client, session_id, count)
        await client.close_session(session_id)
        return decoded(chunks)
    finally:
        await client.close()


async def stream_across_gateways(
    system: RunningSystem, prompt: str, seed: int, disturb: Callable[[TurboServeClient], Awaitable[None]]
) -> list[ReceivedChunk]:
    """Three chunks through gateway 1, ``disturb`` (which ends that connection), then a resume through gateway 2
    at the next seq and three more chunks; the client's whole stream, checked for gaps, duplicates and order."""
    first = await TurboServeClient.connect(system.ws_url, TOKENS[0])
    started = await start_when_workers_registered(first, prompt, seed)
    session_id = str(started["session_id"])
    before = await receive(first, session_id, 3)
    await disturb(first)
    second = await TurboServeClient.connect(system.more_ws_urls[0], TOKENS[0])
    try:
        state = await asyncio.wait_for(second.resume(session_id, next_seq=len(before)), timeout=15)
        assert state["status"] == "active"
        after = await receive(second, session_id, 3)
        await second.close_session(session_id)
    finally:
        await second.close()
    assert [c.header.seq for c in before + after] == list(range(6)), "a gap, a duplicate or a reorder"
    assert session_row(system, session_id) == ("closed", None)
    return before + after


async def test_a_client_reconnecting_through_the_other_gateway_continues_at_its_next_seq_with_the_same_frames(
    two_gateways: RunningSystem,
) -> None:
    async def drop_connection(client: TurboServeClient) -> None:
        await client.close()  # the session lingers on gateway 1

    chunks = await stream_across_gateways(two_gateways, "a lighthouse in a storm", 31, drop_connection)
    await let_go_by_gateway_1(two_gateways, chunks[0].header.session_id)
    expected = await reference_frames(two_gateways.ws_url, "a lighthouse in a storm", 31, 6)
    assert_same_frames(decoded(chunks), expected, "the other gateway's stream")


async def test_another_tokens_session_cannot_be_taken_over_through_the_other_gateway(
    two_gateways: RunningSystem,
) -> None:
    owner = await TurboServeClient.connect(two_gateways.ws_url, TOKENS[0])
    thief = await TurboServeClient.connect(two_gateways.more_ws_urls[0], TOKENS[1])
    try:
        started = await start_when_workers_registered(owner, "a quiet harbour", 5)
        session_id = str(started["session_id"])
        with pytest.raises(ServerError, match="unknown_session"):
            await thief.resume(session_id)
        with pytest.raises(ServerError, match="unknown_session"):
            await thief.close_session(session_id)
        await owner.close_session(session_id)
    finally:
        await owner.close()
        await thief.close()


async def test_the_per_token_limit_holds_across_gateways(two_gateways: RunningSystem) -> None:
    clients = [await TurboServeClient.connect(url, TOKENS[1]) for url in (two_gateways.ws_url,
                                                                          two_gateways.more_ws_urls[0])]
    opened: list[tuple[TurboServeClient, str]] = []
    try:
        for index in range(4):  # the limit is 4 per token: two through each gateway
            client = clients[index % 2]
            started = await start_when_workers_registered(client, f"limit {index}", index)
            opened.append((client, str(started["session_id"])))
        for client in clients:
            with pytest.raises(ServerError, match="limit_exceeded"):
                await client.start("one too many", 9)
    finally:
        for client, session_id in opened:
            await client.close_session(session_id)
        for client in clients:
            await client.close()


async def test_a_gateway_killed_mid_stream_loses_no_chunk_the_client_continues_through_the_other(
    two_gateways: RunningSystem,
) -> None:
    abandoned: list[str] = []
    killed_at: list[float] = []

    async def kill_gateway(client: TurboServeClient) -> None:
        abandoned.append(str((await client.start("nobody comes back for this one", 3))["session_id"]))
        os.kill(two_gateways.child("gateway").process.pid, signal.SIGKILL)
        killed_at.append(time.monotonic())
        await client.close()

    chunks = await stream_across_gateways(two_gateways, "a train crossing a bridge", 77, kill_gateway)
    expected = await reference_frames(two_gateways.more_ws_urls[0], "a train crossing a bridge", 77, 6)
    assert_same_frames(decoded(chunks), expected, "the stream across a gateway kill")
    while session_row(two_gateways, abandoned[0]) != ("closed", None):  # the scheduler closes what nobody resumed
        assert time.monotonic() - killed_at[0] < LEASE_S + LINGER_S + 15, "a dead gateway's session was never closed"
        await asyncio.sleep(0.2)
