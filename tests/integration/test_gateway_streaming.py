"""The gateway streams chunks in order through a real nats-server, with a scripted scheduler and workers."""

from __future__ import annotations

import asyncio
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from services.common.messages import (
    AttachSession,
    ChangePrompt,
    DetachSession,
    OpenSession,
    RequestChunks,
    UpdateSession,
)
from services.gateway.connection import ClientConnection
from services.gateway.outgoing import SlowConsumer
from services.gateway.session import GatewaySession
from tests.integration.gateway_peers import (
    ALICE,
    BOB,
    FAKE_JPEG,
    Client,
    gateway_stack,
    start_session,
)

pytestmark = pytest.mark.integration

async def test_chunks_reach_the_client_in_order_despite_duplicates_reordering_and_stale_epochs(nats_url: str) -> None:
    async with gateway_stack(nats_url, auto=False, paced=False) as stack, stack.client() as client:
        session_id = await start_session(client)
        worker, recorder = stack.worker, stack.worker.recorder
        await recorder.wait_for(RequestChunks, session_id=session_id, up_to_seq=1)
        await worker.publish(session_id, 1, 0)
        await worker.publish(session_id, 1, 0)  # exact replay
        await recorder.wait_for(RequestChunks, session_id=session_id, up_to_seq=2)
        await worker.publish(session_id, 1, 2)  # ahead of seq 1
        await worker.publish(session_id, 0, 1)  # right seq, stale epoch
        await worker.publish(session_id, 1, 1)
        await worker.publish(session_id, 1, 2)  # replay of one that was held
        chunks = await client.chunks_until(3)
        assert [(c.seq, c.epoch) for c in chunks] == [(0, 1), (1, 1), (2, 1)]
        await recorder.wait_for(RequestChunks, session_id=session_id, up_to_seq=4)
        await worker.publish(session_id, 1, 3)
        assert [c.seq for c in await client.chunks_until(4)] == [0, 1, 2, 3]


async def test_a_session_streams_changes_prompt_pauses_resumes_and_closes(nats_url: str) -> None:
    async with gateway_stack(nats_url) as stack, stack.client() as client:
        session_id = await start_session(client, "a red fox")
        opened = await stack.scheduler.recorder.wait_for(OpenSession, session_id=session_id)
        assert (opened.owner, opened.prompt, opened.seed) == ("alice", "a red fox", 7)
        await client.chunks_until(3)
        await client.send(type="prompt", session_id=session_id, prompt="a blue whale")
        prompt_set = await client.next_message()
        assert prompt_set["type"] == "prompt_set"
        change = await stack.worker.recorder.wait_for(ChangePrompt, session_id=session_id)
        assert (change.from_seq, change.prompt) == (prompt_set["from_seq"], "a blue whale")
        await client.send(type="pause", session_id=session_id)
        paused = await client.next_message()
        assert (paused["type"], paused["status"], paused["reason"]) == ("state", "idle", "paused")
        stops_at_seq = int(str(paused["next_seq"]))
        idle = await stack.scheduler.recorder.wait_for(UpdateSession, session_id=session_id, status="idle")
        assert idle.next_seq == stops_at_seq
        await client.chunks_until(stops_at_seq)  # what was requested before the pause still arrives
        await client.send(type="resume", session_id=session_id)
        resumed = await client.next_message()
        assert (resumed["type"], resumed["status"]) == ("state", "active")
        await client.chunks_until(stops_at_seq + 3)
        await client.send(type="close", session_id=session_id)
        closed = await client.next_message()
        assert closed == {"type": "closed", "session_id": session_id, "reason": "client"}
        await stack.worker.recorder.wait_for(DetachSession, session_id=session_id, epoch=1)
        await stack.scheduler.recorder.wait_for(UpdateSession, session_id=session_id, status="closed")
        seqs = [c.seq for c in client.chunks]
        assert seqs == list(range(len(seqs)))


async def test_a_placement_change_mid_stream_reattaches_at_the_next_seq_with_the_prompt_history(nats_url: str) -> None:
    async with gateway_stack(nats_url, auto=False, paced=False) as stack, stack.client() as client:
        session_id = await start_session(client, "a red fox")
        old, w2 = stack.worker, await stack.second_worker("w2")
        await old.recorder.wait_for(RequestChunks, session_id=session_id, up_to_seq=1)
        await old.publish(session_id, 1, 0)
        await client.send(type="prompt", session_id=session_id, prompt="a blue whale")
        assert (await client.next_message())["type"] == "prompt_set"
        change = await old.recorder.wait_for(ChangePrompt, session_id=session_id)
        await old.publish(session_id, 1, 1)
        await client.chunks_until(2)
        epoch = await stack.scheduler.move(session_id, "w2")
        attach = await w2.recorder.wait_for(AttachSession, session_id=session_id, epoch=epoch)
        assert attach.next_seq == 2
        assert attach.prompts == ((0, "a red fox"), (change.from_seq, "a blue whale"))
        moved = await client.next_message()
        assert (moved["type"], moved["reason"], moved["worker_id"], moved["epoch"]) == ("state", "moved", "w2", 2)
        await old.publish(session_id, 1, 2)  # the old owner's late chunk is fenced off
        await old.recorder.wait_for(DetachSession, session_id=session_id, epoch=1)
        chunks = await client.chunks_until(6)
        assert [(c.seq, c.worker_id) for c in chunks[:4]] == [(0, "w1"), (1, "w1"), (2, "w2"), (3, "w2")]
        assert [c.seq for c in chunks] == list(range(len(chunks)))


async def test_a_move_to_an_unreachable_worker_idles_the_session_until_a_resume_finds_it(nats_url: str) -> None:
    async with gateway_stack(nats_url) as stack, stack.client() as client:
        session_id = await start_session(client)
        await client.chunks_until(2)
        await stack.scheduler.move(session_id, "w9")
        failed = await client.next_message()
        assert (failed["type"], failed["code"], failed["session_id"]) == ("error", "unavailable", session_id)
        await stack.scheduler.recorder.wait_for(UpdateSession, session_id=session_id, status="idle")
        w9 = await stack.second_worker("w9")
        await client.send(type="resume", session_id=session_id)
        resumed = await client.next_message()
        assert (resumed["status"], resumed["worker_id"], resumed["epoch"]) == ("active", "w9", 2)
        attach = await w9.recorder.wait_for(AttachSession, session_id=session_id, epoch=2)
        seqs = [chunk.seq for chunk in await client.chunks_until(attach.next_seq + 2)]
        assert seqs == list(range(len(seqs)))
        await stack.worker.recorder.wait_for(DetachSession, session_id=session_id, epoch=1)


async def test_a_paused_session_whose_move_fails_troubles_its_client_with_nothing_and_its_resume_lands(
    nats_url: str,
) -> None:
    async with gateway_stack(nats_url) as stack, stack.client() as client:
        session_id = await start_session(client)
        await client.chunks_until(2)
        await client.send(type="pause", session_id=session_id)
        assert (await client.next_message())["status"] == "idle"
        w9 = await stack.second_worker("w9")
        w9.refuse_attach = True
        epoch = await stack.scheduler.move(session_id, "w9")
        await w9.recorder.wait_for(AttachSession, session_id=session_id, epoch=epoch)
        w9.refuse_attach = False
        await client.send(type="resume", session_id=session_id)
        resumed = await client.next_message()  # the answer to its resume, not an error about a move it never saw
        assert (resumed["type"], resumed["status"], resumed["worker_id"], resumed["epoch"]) == (
            "state", "active", "w9", epoch)
        await w9.recorder.wait_for(AttachSession, session_id=session_id, epoch=epoch, next_seq=resumed["next_seq"])


async def test_a_dropped_connection_lingers_and_only_the_same_token_can_resume_it(nats_url: str) -> None:
    async with gateway_stack(nats_url) as stack:
        async with stack.client() as first:
            session_id = await start_session(first)
            await first.chunks_until(2)
        await stack.scheduler.recorder.wait_for(UpdateSession, session_id=session_id, status="idle")
        async with stack.client(BOB) as intruder:
            await intruder.send(type="resume", session_id=session_id)
            refused = await intruder.next_message()
            assert (refused["type"], refused["code"]) == ("error", "unknown_session")
        async with stack.client() as second:
            await second.send(type="resume", session_id=session_id)
            resumed = await second.next_message()
            assert (resumed["type"], resumed["status"]) == ("state", "active")
            seqs = [chunk.seq for chunk in await second.chunks_until(3)]
            assert 2 <= seqs[0] <= int(str(resumed["next_seq"]))  # the first client read 0 and 1 itself
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


async def test_a_lingering_session_is_closed_when_its_linger_time_runs_out(nats_url: str) -> None:
    async with gateway_stack(nats_url, linger_s=0.05) as stack:
        async with stack.client() as client:
            session_id = await start_session(client)
        await stack.scheduler.recorder.wait_for(UpdateSession, session_id=session_id, status="closed")
        await stack.worker.recorder.wait_for(DetachSession, session_id=session_id, epoch=1)


async def test_a_client_that_stops_reading_gets_slow_consumer_and_close_1013(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    overflowed = asyncio.Event()
    original = ClientConnection.session_overflowed

    def spy(self: ClientConnection, session: GatewaySession, error: SlowConsumer) -> None:
        overflowed.set()
        original(self, session, error)

    monkeypatch.setattr(ClientConnection, "session_overflowed", spy)
    async with gateway_stack(nats_url, queue_chunks=2) as stack:
        stack.worker.frame = FAKE_JPEG[:2] + bytes(256 * 1024)
        async with connect(stack.gateway.ws_url(ALICE), max_size=None, max_queue=1) as ws:
            client = Client(ws)
            await client.send(type="start", prompt="a red fox")
            await asyncio.wait_for(overflowed.wait(), 10)  # the client reads nothing until the gateway gave up
            started = await client.next_message()
            notice = await client.next_message(timeout_s=10)
            assert (notice["type"], notice["code"]) == ("error", "slow_consumer")
            with pytest.raises(ConnectionClosed) as closed:
                await client.next_message(timeout_s=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        session_id = started["session_id"]
        idle = await stack.scheduler.recorder.wait_for(UpdateSession, session_id=session_id, status="idle")
        before = [chunk.seq for chunk in client.chunks]
        assert before == list(range(len(before)))
        async with stack.client() as again:
            await again.send(type="resume", session_id=session_id)
            assert (await again.next_message())["status"] == "active"
            await stack.worker.recorder.wait_for(RequestChunks, session_id=session_id, resend_from_seq=idle.next_seq)
            after = [chunk.seq for chunk in await again.chunks_until(3)]
            assert before + after == list(range(len(before) + len(after)))  # the refused chunk was asked for again


async def test_credit_follows_playback_and_a_played_report_moves_it_to_the_clients_clock(nats_url: str) -> None:
    """One frame a chunk at 1 fps: a chunk plays for a second. The worker may make the chunk after the one on
    screen, not further, however fast it is; each credit says when its chunk must arrive; a client that says it
    plays the next chunk already gets the credit that goes with it at once."""
    async with gateway_stack(nats_url, auto=False, playback_fps=1.0, lead_chunks=2, credit_chunks=4) as stack, \
            stack.client() as client:
        session_id = await start_session(client)
        worker, recorder = stack.worker, stack.worker.recorder
        await recorder.wait_for(RequestChunks, session_id=session_id, up_to_seq=1)  # a new stream: the first two
        await worker.publish(session_id, 1, 0)
        await worker.publish(session_id, 1, 1)
        await client.chunks_until(2)
        await asyncio.sleep(0.3)
        assert max(m.up_to_seq for m in recorder.messages if isinstance(m, RequestChunks)) == 1, \
            "credit ran ahead of playback"
        played_ms = time.time() * 1e3
        await client.send(type="played", session_id=session_id, seq=1)  # its player is a little ahead of ours
        credit = await recorder.wait_for(RequestChunks, session_id=session_id, up_to_seq=2, timeout_s=0.5)
        assert credit.due_unix_ms == pytest.approx(played_ms + 1000.0, abs=300.0), "due when chunk 1 ends"
        assert credit.interval_ms == pytest.approx(1000.0)


async def test_a_pause_takes_back_the_credit_the_worker_has_not_used(nats_url: str) -> None:
    """Generation stops within one chunk of a pause: the worker keeps credit only for the chunk the client needs
    next; the rest is asked for again on resume. Three chunks of lead, so that there is a rest to take back."""
    async with gateway_stack(nats_url, auto=False, playback_fps=1.0, lead_chunks=3) as stack, \
            stack.client() as client:
        session_id = await start_session(client)
        worker, recorder = stack.worker, stack.worker.recorder
        await recorder.wait_for(RequestChunks, session_id=session_id, up_to_seq=1)
        await worker.publish(session_id, 1, 0)
        await client.chunks_until(1)
        await recorder.wait_for(RequestChunks, session_id=session_id, up_to_seq=2)
        await client.send(type="pause", session_id=session_id)
        paused = await client.next_message()
        taken_back = await recorder.wait_for(RequestChunks, session_id=session_id, exact=True)
        assert taken_back.up_to_seq == 1 and paused["next_seq"] == 2
        await worker.publish(session_id, 1, 1)  # the chunk in flight still arrives
        assert [c.seq for c in await client.chunks_until(2)] == [0, 1]
        await client.send(type="resume", session_id=session_id)
        assert (await client.next_message())["status"] == "active"
        resumed = await recorder.wait_for(RequestChunks, session_id=session_id, up_to_seq=3)
        assert resumed.resend_from_seq == 2, "what the worker made past the pause is asked for again"
