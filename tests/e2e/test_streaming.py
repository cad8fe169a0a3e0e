"""End to end through the real path: client -> gateway -> NATS -> worker -> NATS -> gateway -> client, with the
scheduler persisting every session in PostgreSQL."""

from __future__ import annotations

import asyncio

import numpy as np
import psycopg
import pytest

from services.client import ReceivedChunk, TurboServeClient
from tests.e2e.conftest import TOKENS, RunningSystem, decoded, receive, start_when_workers_registered

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def run_scripted_session(system: RunningSystem, token: str, seed: int) -> tuple[str, list[ReceivedChunk]]:
    """Start, 3 chunks, prompt change, 2 chunks, pause, resume, 2 chunks, close."""
    client = await TurboServeClient.connect(system.ws_url, token)
    try:
        started = await start_when_workers_registered(client, f"aurora over glaciers {seed}", seed)
        session_id = str(started["session_id"])
        chunks = await receive(client, session_id, 3)
        await client.set_prompt(session_id, f"a neon city at night {seed}")
        chunks += await receive(client, session_id, 2)
        paused = await client.pause(session_id)
        chunks += await receive(client, session_id, int(paused["next_seq"]) - len(chunks))
        await client.resume(session_id)
        chunks += await receive(client, session_id, 2)
        await client.close_session(session_id)
        return session_id, chunks
    finally:
        await client.close()


async def test_four_concurrent_clients_stream_in_order_with_prompt_change_pause_resume_and_close(
    system: RunningSystem,
) -> None:
    results = await asyncio.gather(*(run_scripted_session(system, TOKENS[i % 2], seed=100 + i) for i in range(4)))
    for session_id, chunks in results:
        seqs = [c.header.seq for c in chunks]
        assert seqs == list(range(len(chunks))), f"{session_id}: gap, duplicate or reorder in {seqs}"
        assert len(chunks) >= 7
        assert [len(c.frames) for c in chunks] == [9] + [12] * (len(chunks) - 1)  # the VAE's first latent frame
        assert [c.header.first_frame for c in chunks] == [0] + [9 + 12 * k for k in range(len(chunks) - 1)]
    with psycopg.connect(system.database_url) as conn:
        rows = conn.execute(
            "select id, status, next_seq, chunks_produced, epoch from sessions where id = any(%s)",
            ([sid for sid, _ in results],),
        ).fetchall()
    assert len(rows) == 4
    delivered = {sid: len(chunks) for sid, chunks in results}
    for session_id, status, next_seq, chunks_produced, epoch in rows:
        assert (status, next_seq, epoch) == ("closed", delivered[session_id], 1)
        assert chunks_produced > 0  # fed by worker heartbeats, which may lag the last chunks


async def test_a_pause_and_resume_in_the_middle_yields_the_same_frames_as_an_uninterrupted_stream(
    system: RunningSystem,
) -> None:
    client = await TurboServeClient.connect(system.ws_url, TOKENS[0])
    try:
        plain = await start_when_workers_registered(client, "waves of amber light", 4242)
        plain_id = str(plain["session_id"])
        reference = await receive(client, plain_id, 6)
        await client.close_session(plain_id)

        paused = await client.start("waves of amber light", 4242)
        paused_id = str(paused["session_id"])
        interrupted = await receive(client, paused_id, 2)
        ack = await client.pause(paused_id)
        interrupted += await receive(client, paused_id, int(ack["next_seq"]) - 2)
        await client.resume(paused_id)
        interrupted += await receive(client, paused_id, 6 - len(interrupted))
        await client.close_session(paused_id)
    finally:
        await client.close()
    difference = np.abs(decoded(reference) - decoded(interrupted)).max()
    assert difference <= 8, f"frames differ by up to {difference} levels after pause/resume"
