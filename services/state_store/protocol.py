"""The snapshot store interface: bytes are staged under a fresh id, then a small head commits them atomically.

Invariants every implementation keeps:
- A reader sees either the previous committed snapshot or the new one, never a half-written one: staged bytes are
  invisible until ``commit`` swaps the session's head in one atomic write.
- Only the latest snapshot of a session is kept: ``commit`` removes the bytes of the head it replaces.
- A head replaces another only if it is strictly newer by ``(epoch, chunk_seq)`` (``supersedes``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from services.common.snapshots import SnapshotHead, StoreLocation
from services.state_store.errors import SnapshotIncomplete, StaleSnapshot

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A session's state as a reader gets it back: the writer's manifest and its buffers, bit for bit.

    ``chunk_seq`` is the last chunk generated before the snapshot; ``created_at`` is wall-clock seconds since the
    Unix epoch; ``buffers`` are writable views into one allocation, so ``torch.frombuffer`` needs no copy.
    """

    session_id: str
    epoch: int
    chunk_seq: int
    created_at: float
    manifest: dict[str, object]
    buffers: tuple[memoryview, ...] = field(repr=False)

    @classmethod
    def from_head(cls, head: SnapshotHead, buffers: Sequence[memoryview]) -> Snapshot:
        return cls(head.session_id, head.epoch, head.chunk_seq, head.created_at, dict(head.manifest), tuple(buffers))


@dataclass(frozen=True, slots=True)
class StagedBlob:
    """What staging wrote: the byte count and digest a commit must announce."""

    total_bytes: int
    digest: str


@dataclass(frozen=True, slots=True)
class BlobRef:
    """Stored bytes found by a sweep; ``written_at_s`` is wall-clock seconds."""

    session_id: str
    snapshot_id: str
    written_at_s: float


class SnapshotStore(Protocol):
    """Durable session snapshots. Writes of one session must be serialised by the caller (the state_store service
    holds a lock per session). The JetStream store is also safe under several service replicas, whose locks do not
    see each other: commits are a compare-and-set on the head, every removal is idempotent, and a commit refuses
    bytes old enough for a sweep to be removing them (``staged_after_s``). The directory store is not: run it
    as one replica."""

    @property
    def location(self) -> StoreLocation:
        """How a client on another process opens this same store to stage and read bytes."""
        ...

    async def stage(self, session_id: str, snapshot_id: str, buffers: Sequence[Buffer]) -> StagedBlob:
        """Write the buffers back to back under a fresh ``snapshot_id``; invisible to readers until committed."""
        ...

    async def commit(self, head: SnapshotHead, *, staged_after_s: float = -math.inf) -> bool:
        """Make ``head`` the session's latest snapshot atomically and remove the bytes of the one it replaces.

        Returns False when this exact head is already committed (a retried request). Raises StaleSnapshot when
        it is not newer, SessionClosed after ``mark_closed``, SnapshotIncomplete when its bytes are not staged or
        were written before ``staged_after_s`` (wall clock; the service sets it well inside the staging timeout,
        so no commit can name bytes that a sweep, in this replica or another, is removing as orphaned).
        """
        ...

    async def head(self, session_id: str) -> SnapshotHead | None:
        """The committed head of the session, or None."""
        ...

    async def read(self, head: SnapshotHead) -> list[memoryview]:
        """The buffers of ``head``, verified against its digest; SnapshotGone if it was superseded meanwhile."""
        ...

    async def discard(self, session_id: str, snapshot_id: str) -> None:
        """Remove the bytes of one snapshot, committed or not; idempotent."""
        ...

    async def delete(self, session_id: str) -> None:
        """Remove everything of the session (head, bytes, closed mark); idempotent."""
        ...

    async def mark_closed(self, session_id: str, closed_at_s: float) -> None:
        """Record that the session closed (wall-clock seconds); its snapshot expires a retention time later."""
        ...

    async def closed_sessions(self) -> dict[str, float]:
        """Every closed session and when it closed."""
        ...

    async def blobs(self) -> list[BlobRef]:
        """Every stored snapshot's bytes, committed or not, so a sweep can find what no head names."""
        ...


def supersedes(current: SnapshotHead | None, new: SnapshotHead) -> bool:
    """Whether ``new`` should replace ``current``: True if strictly newer, False for the same snapshot committed
    again; raises StaleSnapshot for anything older or a different snapshot at the same point."""
    if current is None:
        return True
    if current.snapshot_id == new.snapshot_id:
        return False
    if (new.epoch, new.chunk_seq) > (current.epoch, current.chunk_seq):
        return True
    raise StaleSnapshot(
        f"session {new.session_id}: snapshot at epoch={new.epoch} chunk_seq={new.chunk_seq} is not newer than the "
        f"committed one at epoch={current.epoch} chunk_seq={current.chunk_seq}"
    )


def check_fresh(head: SnapshotHead, written_at_s: float, staged_after_s: float) -> None:
    """Raise SnapshotIncomplete when ``head``'s bytes were written before ``staged_after_s``."""
    if written_at_s < staged_after_s:
        raise SnapshotIncomplete(
            f"snapshot {head.snapshot_id} of {head.session_id} was staged {staged_after_s - written_at_s:.0f} s "
            "too long ago to commit: a sweep may be removing its bytes; stage it again"
        )


def new_head(
    session_id: str,
    snapshot_id: str,
    epoch: int,
    chunk_seq: int,
    manifest: dict[str, object],
    buffers: Sequence[Buffer],
    staged: StagedBlob,
) -> SnapshotHead:
    """The head announcing freshly staged buffers, stamped with the wall-clock time."""
    return SnapshotHead(
        session_id=session_id,
        snapshot_id=snapshot_id,
        epoch=epoch,
        chunk_seq=chunk_seq,
        created_at=time.time(),
        buffer_bytes=tuple(byte_view(buf).nbytes for buf in buffers),
        digest=staged.digest,
        manifest=manifest,
    )


def byte_view(buf: Buffer) -> memoryview:
    """A flat byte view of any C-contiguous buffer, so lengths are bytes whatever the element type."""
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def split(data: bytearray, sizes: Sequence[int]) -> list[memoryview]:
    """Views of consecutive ``sizes`` bytes of ``data``, without copying."""
    whole = memoryview(data)
    views, offset = [], 0
    for size in sizes:
        views.append(whole[offset : offset + size])
        offset += size
    return views
