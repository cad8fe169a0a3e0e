"""What gets removed and when: closed sessions after their retention time, and staged bytes that no head names after
the staging timeout (a writer that died mid-upload or whose commit never came). Superseded snapshots need no
sweep: the commit that supersedes one removes it.

Decisions are pure functions of the stored state and an injected wall clock (stored timestamps are wall time), so
tests run them without sleeping; ``Sweeper`` is the thin loop that applies them under the per-session locks the
service's commits take.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass

from services.state_store.protocol import BlobRef, SnapshotStore

log = logging.getLogger("turboserve.state_store.expiry")

COMMIT_WITHIN = 0.5
"""A commit must name bytes staged within this share of the staging timeout (``SnapshotStore.commit``'s
``staged_after_s``). The rest of the timeout is a margin no commit crosses, so a commit and an orphan sweep never
meet over the same bytes, even in two replicas whose session locks do not see each other."""


def commit_cutoff_s(now_s: float, staging_timeout_s: float) -> float:
    """The earliest staging time a commit at ``now_s`` accepts."""
    return now_s - COMMIT_WITHIN * staging_timeout_s


def due_for_expiry(closed_at_s: Mapping[str, float], now_s: float, retention_s: float) -> list[str]:
    """Sessions closed at least ``retention_s`` ago, oldest first."""
    due = [(closed, session_id) for session_id, closed in closed_at_s.items() if now_s - closed >= retention_s]
    return [session_id for _, session_id in sorted(due)]


def orphaned(
    blobs: Sequence[BlobRef], committed: Mapping[str, str | None], now_s: float, staging_timeout_s: float
) -> list[BlobRef]:
    """Blobs that are not their session's committed snapshot (``committed`` maps session to snapshot id, or None)
    and were written at least ``staging_timeout_s`` ago; younger ones may still be waiting for their commit."""
    return [
        blob
        for blob in blobs
        if committed.get(blob.session_id) != blob.snapshot_id and now_s - blob.written_at_s >= staging_timeout_s
    ]


class KeyedLocks:
    """One asyncio lock per session, dropped when nobody holds or waits for it, so the map stays small."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


@dataclass(frozen=True, slots=True)
class SweepReport:
    expired_sessions: tuple[str, ...]
    orphans_removed: tuple[BlobRef, ...]


class Sweeper:
    """Applies expiry and orphan removal to a store; ``clock`` returns wall-clock seconds."""

    def __init__(
        self,
        store: SnapshotStore,
        locks: KeyedLocks,
        *,
        retention_s: float,
        staging_timeout_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._locks = locks
        self._retention_s = retention_s
        self._staging_timeout_s = staging_timeout_s
        self._clock = clock

    async def sweep_once(self) -> SweepReport:
        now_s = self._clock()
        expired = due_for_expiry(await self._store.closed_sessions(), now_s, self._retention_s)
        for session_id in expired:
            async with self._locks.hold(session_id):
                await self._store.delete(session_id)
        removed = []
        for blob in await self._candidates(now_s):
            async with self._locks.hold(blob.session_id):
                head = await self._store.head(blob.session_id)  # re-checked under the lock: a commit may have won
                if head is None or head.snapshot_id != blob.snapshot_id:
                    await self._store.discard(blob.session_id, blob.snapshot_id)
                    removed.append(blob)
        return SweepReport(tuple(expired), tuple(removed))

    async def run(self, interval_s: float) -> None:
        """Sweep every ``interval_s`` until cancelled; a failed sweep is logged and retried next period.

        A cancel that lands inside the NATS client can be swallowed there (Python 3.11's ``asyncio.wait_for`` drops
        it when its inner future completes at the same moment), so the loop also checks that it is being cancelled:
        a lost cancel once left the state store's shutdown waiting forever on a loaded machine."""
        task = asyncio.current_task()
        while True:
            try:
                report = await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # JetStream away or a damaged entry: the next period tries again
                log.exception("event=sweep_failed")
            else:
                if report.expired_sessions or report.orphans_removed:
                    log.info(
                        "event=swept expired=%d orphans=%d", len(report.expired_sessions), len(report.orphans_removed)
                    )
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            await asyncio.sleep(interval_s)

    async def _candidates(self, now_s: float) -> list[BlobRef]:
        blobs = [blob for blob in await self._store.blobs() if now_s - blob.written_at_s >= self._staging_timeout_s]
        committed: dict[str, str | None] = {}
        for session_id in {blob.session_id for blob in blobs}:
            head = await self._store.head(session_id)
            committed[session_id] = head.snapshot_id if head is not None else None
        return orphaned(blobs, committed, now_s, self._staging_timeout_s)
