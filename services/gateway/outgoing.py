"""A session's bounded queue of chunk frames waiting for the client's socket: named backpressure, no silent loss.

The writer peeks the head, sends it, and only then pops it, so a chunk whose send was cut short by a dropped
connection is still here for the connection that resumes the session. A full queue refuses instead of growing:
the caller turns that into a ``slow_consumer`` error and WebSocket close 1013 (STYLE habit 7).
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

from services.common.errors import Unavailable


@dataclass(frozen=True, slots=True)
class OutgoingChunk:
    seq: int
    frame: bytes


class SlowConsumer(Unavailable):
    """The client reads slower than its session produces; raised instead of buffering without bound."""

    code = "slow_consumer"


class OutgoingChunks:
    """A FIFO of at most ``capacity_chunks`` chunk frames with an awaitable head."""

    def __init__(self, capacity_chunks: int) -> None:
        if capacity_chunks < 1:
            raise ValueError(f"capacity_chunks={capacity_chunks} must be >= 1")
        self.capacity_chunks = capacity_chunks
        self._items: collections.deque[OutgoingChunk] = collections.deque()
        self._not_empty = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def full(self) -> bool:
        return len(self._items) >= self.capacity_chunks

    def put(self, chunk: OutgoingChunk) -> None:
        if self.full():
            raise SlowConsumer(f"{len(self._items)} chunks already wait for the socket (limit {self.capacity_chunks})")
        self._items.append(chunk)
        self._not_empty.set()

    async def head(self) -> OutgoingChunk:
        """Wait for the oldest chunk and return it without removing it."""
        while not self._items:
            self._not_empty.clear()
            await self._not_empty.wait()
        return self._items[0]

    def first_seq(self) -> int | None:
        """The seq the socket gets next; None when nothing waits."""
        return self._items[0].seq if self._items else None

    def pop(self, chunk: OutgoingChunk) -> None:
        """Remove ``chunk`` after it was sent; it must still be the head."""
        if not self._items or self._items[0] is not chunk:
            raise ValueError(f"chunk {chunk.seq} is not at the head of the queue")
        self._items.popleft()

    def clear(self) -> None:
        self._items.clear()
