"""Sequence fencing and credit for one session's chunk stream: strictly in order, never twice, never a gap.

Chunks are fenced by (epoch, seq) (STYLE habit 4). A chunk of any epoch but the current one is dropped, so a
worker that lost the session can never reach the client. A seq below ``next_seq`` or already held is a duplicate;
a seq above ``next_seq`` is held until the gap fills; a seq beyond the credit granted is refused, which bounds
what a peer can make us hold to ``credit_chunks`` items. Pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
from typing import Generic, TypeVar

T = TypeVar("T")


class Verdict(enum.Enum):
    """What the fence did with an offered chunk."""

    READY = "ready"
    """It is the next chunk: take it with ``peek_ready``."""
    HELD = "held"
    """It arrived ahead of a missing one and waits for the gap to fill."""
    DUPLICATE = "duplicate"
    """Already delivered or already held: an exact replay, dropped."""
    STALE_EPOCH = "stale_epoch"
    """From a placement that is not the current one, dropped."""
    BEYOND_CREDIT = "beyond_credit"
    """Further ahead than the credit granted: the peer broke the protocol, dropped."""


def credit_up_to(next_seq: int, credit_chunks: int) -> int:
    """The last seq a worker may produce when the client has been handed everything before ``next_seq``."""
    return next_seq + credit_chunks - 1


class ChunkFence(Generic[T]):
    """Orders one session's chunks and tracks the credit granted to its worker."""

    def __init__(self, *, epoch: int, credit_chunks: int, next_seq: int = 0) -> None:
        if credit_chunks < 1 or next_seq < 0:
            raise ValueError(f"credit_chunks={credit_chunks} must be >= 1 and next_seq={next_seq} >= 0")
        self.epoch = epoch
        self.next_seq = next_seq
        self.credit_chunks = credit_chunks
        self.granted_up_to = next_seq - 1
        self.highest_requested = next_seq - 1
        """The furthest seq the current owner was ever asked for; revoking credit does not lower it."""
        self._held: dict[int, T] = {}

    @property
    def held_count(self) -> int:
        return len(self._held)

    def offer(self, epoch: int, seq: int, item: T) -> Verdict:
        if epoch != self.epoch:
            return Verdict.STALE_EPOCH
        if seq < self.next_seq or seq in self._held:
            return Verdict.DUPLICATE
        if seq > self.granted_up_to:
            return Verdict.BEYOND_CREDIT
        self._held[seq] = item
        return Verdict.READY if seq == self.next_seq else Verdict.HELD

    def peek_ready(self) -> T | None:
        """The chunk at ``next_seq`` if it has arrived; the caller delivers it, then calls ``advance``."""
        return self._held.get(self.next_seq)

    def advance(self) -> None:
        """Mark the chunk at ``next_seq`` as handed to the client."""
        if self._held.pop(self.next_seq, None) is None:
            raise ValueError(f"advance past seq {self.next_seq}, which has not arrived")
        self.next_seq += 1

    def grant(self, limit: int | None = None) -> int | None:
        """Extend the credit to keep ``credit_chunks`` in flight, but not past ``limit`` (playback pacing); the new
        ``up_to_seq``, or None if nothing is due."""
        up_to = credit_up_to(self.next_seq, self.credit_chunks)
        if limit is not None:
            up_to = min(up_to, limit)
        if up_to <= self.granted_up_to:
            return None
        self.granted_up_to = up_to
        self.highest_requested = max(self.highest_requested, up_to)
        return up_to

    def rebase(self, epoch: int) -> None:
        """A new placement: drop what the old owner sent ahead; the new owner starts at ``next_seq`` with no credit."""
        self.epoch = epoch
        self._held.clear()
        self.granted_up_to = self.next_seq - 1
        self.highest_requested = self.next_seq - 1

    def rewind(self, next_seq: int) -> None:
        """The client lost what was handed to it from ``next_seq`` on (a cut connection): hand it over again from
        there, with no credit until the next grant asks the worker to replay it."""
        if next_seq > self.next_seq:
            raise ValueError(f"rewind to {next_seq} is past the next seq {self.next_seq}")
        self.next_seq = next_seq
        self._held.clear()
        self.granted_up_to = next_seq - 1

    def take_back(self, up_to: int) -> None:
        """Lower the credit to ``up_to`` (a pause): chunks past it are no longer wanted, held or arriving."""
        self.granted_up_to = min(self.granted_up_to, up_to)
        self._held = {seq: item for seq, item in self._held.items() if seq <= self.granted_up_to}

    def revoke_credit(self) -> None:
        """Forget credit for chunks we refused (queue overflow), so the next grant asks for them again."""
        self._held.clear()
        self.granted_up_to = self.next_seq - 1
