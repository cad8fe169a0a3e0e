"""The scheduler's decisions about sessions and workers: read the store, ask the pure placement rule, write
back conditionally, and hand the runner the messages to send. No NATS here, so all of it runs in unit tests
against the in-memory store with a fake clock.

One asyncio lock serialises this process's session decisions, so two requests never both take a worker's last
slot; between scheduler processes the epoch fence in the store is what keeps a session in one place.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from services.common import subjects
from services.common.errors import InvalidField, InvalidState, StaleEpoch, Unavailable, UnknownSession
from services.common.messages import OpenSession, Placement, Reply, UpdateSession, WorkerGone, WorkerHeartbeat
from services.common.telemetry.tracing import record_decision
from services.scheduler.placement import PlacementRule, WorkerLoad, choose_worker
from services.scheduler.store.protocol import (
    SchedulerStore,
    SessionExists,
    SessionRecord,
    WorkerRecord,
    WorkerReport,
)

log = logging.getLogger("turboserve.scheduler")
RESTART_GRACE_TIMEOUTS = 10
"""How many worker timeouts of silence a restarted scheduler forgives (the time it was itself down)."""


class NoCapacity(Unavailable):
    """No live worker of the session's model has room; the caller may retry later."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def log_decision(decision: str, session_id: str, reason: str, **fields: object) -> None:
    """Log the decision and record it as a span carrying its reason (STYLE habit 3)."""
    extra = "".join(f" {name}={value}" for name, value in fields.items())
    log.info("decision=%s session=%s%s reason=%r", decision, session_id, extra, reason)
    record_decision(decision, reason, session_id=session_id, **fields)


def subject_token(name: str, value: str) -> str:
    """Ids end up in NATS subjects (placement.<session_id>, worker.<worker_id>): refuse those that cannot."""
    try:
        return subjects.check_token(name, value)
    except ValueError as exc:
        raise InvalidField(str(exc)) from None


class Coordinator:
    """Answers session requests and worker reports; ``sweep`` is the periodic scheduling event where lost
    workers are detected and sessions without a live worker are placed again."""

    def __init__(
        self,
        store: SchedulerStore,
        *,
        worker_timeout_s: float,
        place: PlacementRule = choose_worker,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._store = store
        self._worker_timeout_s = worker_timeout_s
        self._place = place
        self._clock = clock
        self._wall_clock = wall_clock
        self._decide = asyncio.Lock()
        self._last_heard_s: dict[str, float] = {}
        self._heard_here: set[str] = set()
        """Workers this scheduler has heard a heartbeat from: the only ones new sessions are placed on, since a
        row recorded live before a restart may belong to a worker that is not there (or not subscribed yet)."""

    async def start(self) -> None:
        """Rebuild liveness from the store. A worker recorded live gets a full timeout from now: no heartbeat
        could be heard while no scheduler ran, so a short silence is no evidence. A row silent for longer than
        ``RESTART_GRACE_TIMEOUTS`` timeouts is another matter (a worker of an earlier run that never said
        goodbye): it is marked lost at once, so no new session is placed on a worker that is not there."""
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

    async def open_session(self, request: OpenSession) -> Placement:
        subject_token("session_id", request.session_id)
        async with self._decide:
            existing = await self._store.get_session(request.session_id)
            if existing is not None:
                return self._repeat_open(request, existing)
            choice = self._place(await self._worker_loads(), model=request.model)
            if choice.worker_id is None:
                log_decision("refuse", request.session_id, choice.reason)
                raise NoCapacity(choice.reason)
            now = self._wall_clock()
            session = SessionRecord(
                session_id=request.session_id,
                owner=request.owner,
                prompt=request.prompt,
                seed=request.seed,
                model=request.model,
                status="active",
                worker_id=choice.worker_id,
                epoch=1,
                chunks_produced=0,
                next_seq=0,
                created_at=now,
                updated_at=now,
            )
            await self._store.insert_session(session)
        log_decision("place", session.session_id, choice.reason, worker=choice.worker_id, epoch=1)
        return Placement(session.session_id, choice.worker_id, 1, choice.reason)

    @staticmethod
    def _repeat_open(request: OpenSession, existing: SessionRecord) -> Placement:
        """A retried open (the first reply was lost) gets the placement it already has, and nothing else does."""
        if existing.owner != request.owner or existing.worker_id is None or existing.status == "closed":
            raise SessionExists(f"session {request.session_id} already exists")
        return Placement(existing.session_id, existing.worker_id, existing.epoch, "already open")

    async def update_session(self, request: UpdateSession) -> Placement | Reply:
        async with self._decide:
            session = await self._store.get_session(request.session_id)
            if session is None:
                raise UnknownSession(f"session {request.session_id} does not exist")
            if session.status == "closed":
                if request.status == "closed":
                    return Reply(ok=True, detail="already closed")
                raise InvalidState(f"session {request.session_id} is closed and cannot become {request.status}")
            if request.status == "closed":
                await self._store.clear_placement(
                    session.session_id, expected_epoch=session.epoch, status="closed", at=self._wall_clock(),
                    next_seq=request.next_seq,
                )
                log_decision("close", session.session_id, request.reason or "closed by its client",
                             worker=session.worker_id)
                return Reply(ok=True)
            if request.status == "idle":
                return await self._pause(session, request.next_seq)
            return await self._resume(session, request.next_seq)

    async def _pause(self, session: SessionRecord, next_seq: int) -> Placement | Reply:
        updated = await self._store.set_status(
            session.session_id, expected_epoch=session.epoch, status="idle", next_seq=next_seq, at=self._wall_clock()
        )
        log_decision("keep", session.session_id, "paused; its state stays on its worker", worker=updated.worker_id)
        if updated.worker_id is None:
            return Reply(ok=True, detail="paused; placed again on resume")
        return Placement(updated.session_id, updated.worker_id, updated.epoch, "paused")

    async def _resume(self, session: SessionRecord, next_seq: int) -> Placement:
        loads = await self._worker_loads()
        at = self._wall_clock()
        # Its worker probably still holds the state: keep it there while the worker is timed as live, which
        # includes the grace a restarted scheduler gives workers it has not heard from yet.
        if session.worker_id is not None and session.worker_id in self._last_heard_s:
            worker_id = session.worker_id
            updated = await self._store.set_status(
                session.session_id, expected_epoch=session.epoch, status="active", next_seq=next_seq, at=at
            )
            reason = f"resumed on its worker {worker_id}, which is alive"
        else:
            choice = self._place(loads, model=session.model)
            if choice.worker_id is None:
                log_decision("refuse", session.session_id, choice.reason)
                raise NoCapacity(choice.reason)
            worker_id = choice.worker_id
            updated = await self._store.move_session(
                session.session_id, expected_epoch=session.epoch, worker_id=worker_id, status="active", at=at
            )
            reason = f"resumed; {choice.reason}"
        log_decision("place", session.session_id, reason, worker=worker_id, epoch=updated.epoch)
        return Placement(session.session_id, worker_id, updated.epoch, reason)

    async def observe_heartbeat(self, beat: WorkerHeartbeat) -> None:
        subject_token("worker_id", beat.worker_id)
        if beat.worker_id not in self._last_heard_s:
            log.info("event=worker_live worker=%s model=%s capacity=%d", beat.worker_id, beat.model, beat.capacity)
        self._last_heard_s[beat.worker_id] = self._clock()
        self._heard_here.add(beat.worker_id)
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

    async def worker_gone(self, notice: WorkerGone) -> list[Placement]:
        async with self._decide:
            self._last_heard_s.pop(notice.worker_id, None)
            self._heard_here.discard(notice.worker_id)
            if await self._store.retire_worker(notice.worker_id, "gone"):
                log.info("event=worker_gone worker=%s reason='it announced a clean shutdown'", notice.worker_id)
            return await self._rehome()

    async def sweep(self) -> list[Placement]:
        """Mark workers silent for longer than the timeout lost, then place every session that needs it."""
        async with self._decide:
            now_s = self._clock()
            for worker_id, heard_s in list(self._last_heard_s.items()):
                silent_s = now_s - heard_s
                if silent_s <= self._worker_timeout_s:
                    continue
                del self._last_heard_s[worker_id]
                self._heard_here.discard(worker_id)
                if await self._store.retire_worker(worker_id, "lost"):
                    log.info(
                        "event=worker_lost worker=%s reason='no heartbeat for %.2f s, timeout %.2f s'",
                        worker_id, silent_s, self._worker_timeout_s,
                    )
            return await self._rehome()

    async def _rehome(self) -> list[Placement]:
        """Sessions whose worker is not live: idle ones are unplaced (placed again on resume), active ones
        move to the best live worker with a bumped epoch; with no room they wait, unplaced, for a later sweep."""
        orphans = await self._store.orphaned_sessions()
        if not orphans:
            return []
        workers = await self._store.list_workers()
        status = {w.worker_id: w.status for w in workers}
        loads = {w.worker_id: w for w in await self._worker_loads(workers)}
        placements: list[Placement] = []
        for session in orphans:
            if session.worker_id is None:
                why = "it waited for capacity"
            else:
                why = f"worker {session.worker_id} {status.get(session.worker_id, 'unknown')}"
            try:
                placement = await self._rehome_one(session, list(loads.values()), why)
            except StaleEpoch as exc:
                log_decision("skip", session.session_id, f"moved by another scheduler: {exc}")
                continue
            if placement is not None:
                placements.append(placement)
                chosen = loads[placement.worker_id]
                loads[chosen.worker_id] = dataclasses.replace(chosen, active_sessions=chosen.active_sessions + 1)
        return placements

    async def _rehome_one(self, session: SessionRecord, loads: list[WorkerLoad], why: str) -> Placement | None:
        at = self._wall_clock()
        if session.status == "idle":
            await self._store.clear_placement(session.session_id, expected_epoch=session.epoch, status="idle", at=at)
            log_decision("unplace", session.session_id, f"{why}; idle, placed again on resume")
            return None
        choice = self._place(loads, model=session.model)
        if choice.worker_id is None:
            if session.worker_id is not None:
                await self._store.clear_placement(
                    session.session_id, expected_epoch=session.epoch, status="active", at=at
                )
                log_decision("unplace", session.session_id, f"{why}; {choice.reason}; retried every sweep")
            return None
        moved = await self._store.move_session(
            session.session_id, expected_epoch=session.epoch, worker_id=choice.worker_id, status="active", at=at
        )
        log_decision("place", session.session_id, f"{why}; {choice.reason}", worker=choice.worker_id, epoch=moved.epoch)
        return Placement(session.session_id, choice.worker_id, moved.epoch, why)

    async def _worker_loads(self, workers: list[WorkerRecord] | None = None) -> list[WorkerLoad]:
        if workers is None:
            workers = await self._store.list_workers()
        active = await self._store.active_load()
        return [
            WorkerLoad(
                worker_id=w.worker_id,
                model=w.model,
                capacity=w.capacity,
                active_sessions=active.get(w.worker_id, 0),
                live=w.status == "live" and w.worker_id in self._heard_here,
                draining=w.draining,
            )
            for w in workers
        ]
