"""The gateway's model of a client's playback: what plays when, how far ahead credit reaches, when each chunk is
due, and what counts as a stall."""

from __future__ import annotations

import pytest

from services.gateway.fencing import ChunkFence
from services.gateway.playback import PlaybackClock

FPS = 16.0


def test_chunks_play_back_to_back_and_credit_never_reaches_past_lead_chunks_of_video() -> None:
    clock = PlaybackClock(fps=FPS, lead_chunks=2)
    assert clock.credit_up_to(now=0.0) == 1, "before anything plays: the first two chunks"
    first = clock.delivered(0, frames=12, now=10.0)
    assert (first.starts_s, first.ends_s) == (10.0, 10.75)
    assert clock.credit_up_to(10.0) == 1, "the next chunk is made while the first plays"
    second = clock.delivered(1, frames=12, now=10.2)  # early: it waits for the first to end
    assert second.starts_s == 10.75
    assert clock.playing(10.5) == 0 and clock.credit_up_to(10.5) == 1, "two chunks of video past the playhead"
    assert clock.next_credit_at(10.5) == 10.75
    assert clock.playing(10.8) == 1 and clock.credit_up_to(10.8) == 2
    assert clock.stalls == 0
    assert PlaybackClock(fps=FPS, lead_chunks=4).credit_up_to(10.8) == 3, "a new stream: the first four"


def test_a_lead_that_leaves_nothing_to_generate_while_a_chunk_plays_is_refused() -> None:
    with pytest.raises(ValueError, match="lead_chunks=1"):
        PlaybackClock(fps=FPS, lead_chunks=1)


def test_a_chunk_arriving_after_the_previous_ended_is_a_stall_and_starts_when_it_arrives() -> None:
    clock = PlaybackClock(fps=FPS, lead_chunks=2)
    clock.delivered(0, frames=12, now=0.0)
    late = clock.delivered(1, frames=12, now=1.0)
    assert late.starts_s == 1.0
    assert clock.stalls == 1 and clock.stalled_s == pytest.approx(0.25)
    assert clock.playing(1.1) == 1


def test_each_chunk_is_due_when_the_one_before_it_ends() -> None:
    clock = PlaybackClock(fps=FPS, lead_chunks=2)
    assert clock.deadline(0, now=5.0) == 5.0, "nothing plays yet: wanted at once"
    clock.delivered(0, frames=12, now=5.0)
    clock.delivered(1, frames=12, now=5.1)
    assert clock.deadline(2, now=5.2) == pytest.approx(6.5)
    assert clock.deadline(3, now=5.2) == pytest.approx(7.25)


def test_a_pause_restarts_the_clock_at_the_next_chunk_and_a_played_report_moves_it() -> None:
    clock = PlaybackClock(fps=FPS, lead_chunks=2)
    clock.delivered(0, frames=12, now=0.0)
    clock.pause()
    assert clock.credit_up_to(100.0) == 1, "resumed: the chunk after the last delivered"
    resumed = clock.delivered(1, frames=12, now=100.0)
    assert resumed.starts_s == 100.0 and clock.stalls == 0, "a pause is not a stall"
    clock.delivered(2, frames=12, now=100.1)
    clock.played(1, now=100.5)  # the client started it later than we thought (its own buffering)
    assert clock.playing(101.2) == 1 and clock.playing(101.3) == 2


def test_the_fence_grants_up_to_the_pacing_limit_and_a_pause_takes_back_the_rest() -> None:
    fence: ChunkFence[bytes] = ChunkFence(epoch=1, credit_chunks=4)
    assert fence.grant(limit=1) == 1
    assert fence.grant(limit=1) is None, "nothing more until playback moves"
    assert fence.grant(limit=5) == 3, "never past credit_chunks ahead of delivery"
    fence.offer(1, 0, b"a")
    fence.offer(1, 2, b"c")
    fence.take_back(1)
    assert fence.granted_up_to == 1 and fence.offer(1, 3, b"d").value == "beyond_credit"
    assert fence.peek_ready() == b"a"


def test_a_client_behind_our_model_holds_the_credit_back_to_its_own_clock() -> None:
    """A player that buffered: our model has chunk 1 long finished when the client says it starts now."""
    clock = PlaybackClock(fps=FPS, lead_chunks=2)
    for seq in range(3):
        clock.delivered(seq, frames=12, now=0.1 * seq)
    assert clock.playing(2.0) == 2
    clock.played(1, now=2.0)
    assert clock.playing(2.5) == 1 and clock.credit_up_to(2.5) == 2
    assert clock.next_credit_at(2.5) == pytest.approx(2.75)
    clock.played(99, now=3.0)  # never delivered: ignored
    assert clock.playing(2.5) == 1
