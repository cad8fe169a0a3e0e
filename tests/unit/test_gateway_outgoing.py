"""The outgoing queue is bounded, names its backpressure, and loses nothing a cut-short send did not deliver."""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.outgoing import OutgoingChunk, OutgoingChunks, SlowConsumer


def test_a_full_queue_refuses_with_slow_consumer_instead_of_growing() -> None:
    queue = OutgoingChunks(capacity_chunks=2)
    queue.put(OutgoingChunk(0, b"a"))
    queue.put(OutgoingChunk(1, b"b"))
    with pytest.raises(SlowConsumer) as refused:
        queue.put(OutgoingChunk(2, b"c"))
    assert refused.value.code == "slow_consumer" and len(queue) == 2


async def test_the_head_stays_queued_until_it_is_popped_after_sending() -> None:
    queue = OutgoingChunks(capacity_chunks=2)
    waiting = asyncio.create_task(queue.head())
    await asyncio.sleep(0)  # let it block on the empty queue; this is not a readiness wait
    first = OutgoingChunk(0, b"a")
    queue.put(first)
    assert await waiting is first
    assert await queue.head() is first and len(queue) == 1 and queue.first_seq() == 0
    queue.pop(first)
    assert len(queue) == 0 and queue.first_seq() is None


def test_popping_anything_but_the_head_is_a_bug_and_raises() -> None:
    queue = OutgoingChunks(capacity_chunks=2)
    queue.put(OutgoingChunk(0, b"a"))
    with pytest.raises(ValueError):
        queue.pop(OutgoingChunk(0, b"a"))
