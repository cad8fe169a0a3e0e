"""The chunk fence delivers each seq once, in order, only from the current epoch and only within the credit."""

from __future__ import annotations

from typing import TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.gateway.fencing import ChunkFence, Verdict, credit_up_to

T = TypeVar("T")


def drain(fence: ChunkFence[T]) -> list[T]:
    delivered = []
    while (item := fence.peek_ready()) is not None:
        delivered.append(item)
        fence.advance()
    return delivered


def granted_fence(credit_chunks: int = 2, epoch: int = 1) -> ChunkFence[str]:
    fence: ChunkFence[str] = ChunkFence(epoch=epoch, credit_chunks=credit_chunks)
    fence.grant()
    return fence


def test_credit_keeps_the_window_of_chunks_in_flight_past_the_last_delivered() -> None:
    assert credit_up_to(0, 2) == 1
    assert credit_up_to(5, 3) == 7


def test_the_next_chunk_is_ready_at_once() -> None:
    fence = granted_fence()
    assert fence.offer(1, 0, "c0") is Verdict.READY
    assert drain(fence) == ["c0"] and fence.next_seq == 1


def test_an_exact_replay_is_named_a_duplicate_whether_delivered_or_held() -> None:
    fence = granted_fence()
    fence.offer(1, 0, "c0")
    drain(fence)
    assert fence.offer(1, 0, "c0 again") is Verdict.DUPLICATE
    fence.grant()
    assert fence.offer(1, 2, "c2") is Verdict.HELD
    assert fence.offer(1, 2, "c2 again") is Verdict.DUPLICATE


def test_a_chunk_ahead_of_a_gap_waits_until_the_gap_fills() -> None:
    fence = granted_fence(credit_chunks=3)
    assert fence.offer(1, 2, "c2") is Verdict.HELD
    assert fence.offer(1, 1, "c1") is Verdict.HELD
    assert drain(fence) == [] and fence.held_count == 2
    assert fence.offer(1, 0, "c0") is Verdict.READY
    assert drain(fence) == ["c0", "c1", "c2"]


def test_a_chunk_of_another_epoch_is_stale_and_dropped() -> None:
    fence = granted_fence(epoch=2)
    assert fence.offer(1, 0, "old owner") is Verdict.STALE_EPOCH
    assert fence.offer(3, 0, "unknown owner") is Verdict.STALE_EPOCH
    assert drain(fence) == []


def test_a_chunk_beyond_the_credit_is_refused_so_a_peer_cannot_make_us_hold_more() -> None:
    fence = granted_fence(credit_chunks=2)
    assert fence.offer(1, 2, "too far") is Verdict.BEYOND_CREDIT
    assert fence.held_count == 0


def test_credit_is_granted_only_when_delivery_moved_the_window() -> None:
    fence: ChunkFence[str] = ChunkFence(epoch=1, credit_chunks=2)
    assert fence.grant() == 1
    assert fence.grant() is None
    fence.offer(1, 0, "c0")
    drain(fence)
    assert fence.grant() == 2


def test_a_rebase_drops_what_the_old_owner_sent_ahead_and_restarts_credit_at_next_seq() -> None:
    fence = granted_fence(credit_chunks=3)
    fence.offer(1, 0, "c0")
    fence.offer(1, 2, "c2")
    drain(fence)
    fence.rebase(2)
    assert (fence.epoch, fence.next_seq, fence.held_count) == (2, 1, 0)
    assert fence.offer(2, 1, "new c1") is Verdict.BEYOND_CREDIT
    assert fence.grant() == 3
    assert fence.offer(2, 1, "new c1") is Verdict.READY


def test_revoking_credit_asks_again_for_every_undelivered_chunk() -> None:
    fence = granted_fence(credit_chunks=2)
    fence.offer(1, 1, "c1")
    fence.revoke_credit()
    assert fence.held_count == 0 and fence.granted_up_to == -1
    assert fence.highest_requested == 1  # a prompt change must still land after what the worker may have made
    assert fence.grant() == 1


def test_advancing_past_a_missing_chunk_is_a_bug_and_raises() -> None:
    fence = granted_fence()
    with pytest.raises(ValueError):
        fence.advance()


@given(
    count=st.integers(min_value=1, max_value=30),
    order=st.randoms(use_true_random=False),
    duplicates=st.lists(st.integers(min_value=0, max_value=29), max_size=10),
)
def test_any_arrival_order_with_replays_and_stale_chunks_delivers_each_seq_once_in_order(
    count: int, order: object, duplicates: list[int]
) -> None:
    fence: ChunkFence[int] = ChunkFence(epoch=2, credit_chunks=count)
    fence.grant()
    arrivals = [(2, seq) for seq in range(count)] + [(2, d % count) for d in duplicates] + [(1, 0), (3, count - 1)]
    order.shuffle(arrivals)  # type: ignore[attr-defined]
    delivered: list[int] = []
    for epoch, seq in arrivals:
        fence.offer(epoch, seq, seq)
        delivered.extend(drain(fence))
    assert delivered == list(range(count))

