"""Which workers are alive, from heartbeats, goodbyes, silence and probes. Nothing here places a session: a worker
found lost or gone is a scheduling event, and the control loop's next decision moves what it held.

A worker whose heartbeat is late (1.5 of its own intervals) is probed: if NATS says nobody listens on its control
subject any more, its process is gone (a killed process's connection closes at once) and it is lost right away,
without waiting out the timeout. A frozen or partitioned worker still has its subscription, so for it only the
timeout decides.

Liveness is per scheduler process. A worker this process has not heard yet is not offered new sessions even if
its row says live (it may not be subscribed), and a restarted scheduler forgives a recorded worker one full
timeout, since no heartbeat could be heard while no scheduler ran.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from services.common import subjects
from services.common.errors import InvalidField
from services.common.messages import WorkerGone, WorkerHeartbeat
from services.scheduler.store.protocol import SchedulerStore, WorkerReport

log = logging.getLogger("turboserve.scheduler")
RESTART_GRACE_TIMEOUTS = 10
"""How many worker timeouts of silence a restarted scheduler forgives (the time it was itself down)."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def subject_token(name: str, value: str) -> str:
    """Ids end up in NATS subjects (placement.<session_id>, worker.<worker_id>): refuse those that cannot."""
    try:
        return subjects.check_token(name, value)
    except ValueError as exc:
        raise InvalidField(str(exc)) from None


class WorkerLiveness:
    """Heartbeats in, ``lost``/``gone`` rows out. ``timed``: workers with a running timeout (heard, or
    recorded live when this process started); ``heard``: the subset that beat since this process started."""

    def __init__(
        self,
        store: SchedulerStore,
        *,
        worker_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._store = store
        self._worker_timeout_s = worker_timeout_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._last_heard_s: dict[str, float] = {}
        self._interval_s: dict[str, float] = {}
        self.heard: set[str] = set()

    async def start(self) -> None:
        """Rebuild timers from the store. A row silent for longer than ``RESTART_GRACE_TIMEOUTS`` timeouts (a
        worker of an earlier run that never said goodbye) is marked lost at once."""
        now_s, now_wall = self._clock(), self._wall_clock()
        for worker in await self._store.list_workers():
            if worker.status != "live":
                continue
            silent_s = (now_wall - worker.last_seen).total_seconds()
            if silent_s > RESTART_GRACE_TIMEOUTS * self._worker_timeout_s:
                await self._store.retire_worker(worker.worker_id, "lost")
                log.info("event=worker_lost worker=%s reason='silent for %.0f s before this scheduler started'",
                         worker.worker_id, silent_s)
            else:
                self._last_heard_s[worker.worker_id] = now_s
        log.info("event=start live_workers=%d worker_timeout_s=%s", len(self._last_heard_s), self._worker_timeout_s)

    async def observe_heartbeat(self, beat: WorkerHeartbeat) -> None:
        self.heard_from(beat)
        await self.record(beat)

    def heard_from(self, beat: WorkerHeartbeat) -> None:
        """Restart the worker's timeout, as the beat arrives: the runner calls this before queueing ``record``, so a
        slow database delays the rows, never the timer (heartbeats waiting on it once made live workers lost)."""
        subject_token("worker_id", beat.worker_id)
        if beat.worker_id not in self.heard:
            log.info("event=worker_live worker=%s model=%s capacity=%d", beat.worker_id, beat.model, beat.capacity)
        now_s = self._clock()
        previous_s = self._last_heard_s.get(beat.worker_id)
        if previous_s is not None and beat.worker_id in self.heard:  # its heartbeat interval, smoothed
            gap_s = now_s - previous_s
            known_s = self._interval_s.get(beat.worker_id, gap_s)
            self._interval_s[beat.worker_id] = 0.8 * known_s + 0.2 * gap_s
        self._last_heard_s[beat.worker_id] = now_s
        self.heard.add(beat.worker_id)

    async def record(self, beat: WorkerHeartbeat) -> None:
        """The worker's row and chunk counts, from a beat ``heard_from`` has taken."""
        now = self._wall_clock()
        report = WorkerReport(
            worker_id=beat.worker_id,
            kind=beat.kind,
            model=beat.model,
            capacity=beat.capacity,
            active_sessions=beat.active_sessions,
            draining=beat.draining,
            started_at=datetime.fromtimestamp(beat.started_at_s, UTC) if beat.started_at_s > 0 else now,
            latency_samples=beat.recent_batches,
        )
        await self._store.upsert_worker(report, now)
        # A beat whose upsert lands after the worker's WorkerGone revived its row: time it again, so the sweep
        # marks it lost instead of leaving a live row that no timer watches.
        self._last_heard_s.setdefault(beat.worker_id, self._clock())
        await self._store.record_chunks(beat.worker_id, beat.sessions, now)

    async def worker_gone(self, notice: WorkerGone) -> bool:
        """A clean shutdown; True when it changed the worker's row."""
        self._forget(notice.worker_id)
        if await self._store.retire_worker(notice.worker_id, "gone"):
            log.info("event=worker_gone worker=%s reason='it announced a clean shutdown'", notice.worker_id)
            return True
        return False

    async def sweep(self) -> list[str]:
        """Mark workers silent for longer than the timeout lost; returns the ones this call marked."""
        now_s = self._clock()
        lost: list[str] = []
        for worker_id, heard_s in list(self._last_heard_s.items()):
            silent_s = now_s - heard_s
            if silent_s <= self._worker_timeout_s:
                continue
            self._forget(worker_id)
            if await self._store.retire_worker(worker_id, "lost"):
                log.info("event=worker_lost worker=%s reason='no heartbeat for %.2f s, timeout %.2f s'",
                         worker_id, silent_s, self._worker_timeout_s)
                lost.append(worker_id)
        return lost

    def late(self) -> list[str]:
        """Workers heard here whose heartbeat is overdue by half an interval, but not yet timed out: probe them."""
        now_s = self._clock()
        return [
            worker_id for worker_id, heard_s in self._last_heard_s.items()
            if worker_id in self._interval_s
            and max(0.05, 1.5 * self._interval_s[worker_id]) < now_s - heard_s <= self._worker_timeout_s
        ]

    async def lose(self, worker_id: str, reason: str) -> bool:
        """Mark a worker lost before its timeout (a probe showed its process is gone); True if this changed it."""
        self._forget(worker_id)
        if await self._store.retire_worker(worker_id, "lost"):
            log.info("event=worker_lost worker=%s reason=%r", worker_id, reason)
            return True
        return False

    def _forget(self, worker_id: str) -> None:
        self._last_heard_s.pop(worker_id, None)
        self._interval_s.pop(worker_id, None)
        self.heard.discard(worker_id)
