"""The scheduler's session-state mobility outside the policy: operator requests, the idle-offload rule, and
telling the state store when a session closed (its snapshots then expire).

The idle rule is one small function (``sessions_to_offload``) on purpose: the closed-loop policy's Offload
actions replace it, and then only the loop that calls it goes away. Heartbeats tell which sessions a worker
holds in a slot and how long each has produced nothing; PostgreSQL has the last word on whether one is idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self, TypeVar, cast

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from services.common import subjects
from services.common.admin import MigrateSession, OffloadRequest
from services.common.errors import (
    InvalidState,
    TurboServeError,
    Unavailable,
    UnknownSession,
)
from services.common.messages import Reply, UpdateSession, WorkerHeartbeat
from services.common.wire import Message, decode, encode
from services.scheduler.state_mover import NatsStateMover
from services.scheduler.store.protocol import SchedulerStore
from services.state_store.client import SnapshotClient

log = logging.getLogger("turboserve.scheduler.mobility")
QUEUE_GROUP = "turboserve-scheduler-admin"
M = TypeVar("M", bound=Message)


@dataclass(slots=True)
class _Resident:
    worker_id: str
    chunks: int
    quiet_since_s: float


class IdleTracker:
    """Per session held in a worker's slot: since when its chunk count has not moved (from heartbeats)."""

    def __init__(self) -> None:
        self._residents: dict[str, _Resident] = {}

    def observe(self, beat: WorkerHeartbeat, now_s: float) -> None:
        offloaded = set(beat.offloaded)
        for session_id in [s for s, r in self._residents.items() if r.worker_id == beat.worker_id]:
            if session_id not in beat.sessions or session_id in offloaded:
                del self._residents[session_id]
        for session_id, chunks in beat.sessions.items():
            if session_id in offloaded:
                continue
            known = self._residents.get(session_id)
            if known is None or known.worker_id != beat.worker_id or known.chunks != chunks:
                self._residents[session_id] = _Resident(beat.worker_id, chunks, now_s)

    def quiet(self, now_s: float) -> dict[str, tuple[str, float]]:
        """session_id -> (worker, seconds without a new chunk)."""
        return {sid: (r.worker_id, now_s - r.quiet_since_s) for sid, r in self._residents.items()}

    def restart_clock(self, session_id: str, now_s: float) -> None:
        """After an offload attempt that did not happen: wait a full period before the next one."""
        if session_id in self._residents:
            self._residents[session_id].quiet_since_s = now_s


def sessions_to_offload(quiet: dict[str, tuple[str, float]], after_s: float) -> list[tuple[str, str]]:
    """The idle rule: (session, worker) for every session resident in a slot and quiet for ``after_s``."""
    return sorted((sid, worker) for sid, (worker, quiet_s) in quiet.items() if quiet_s >= after_s)


class MobilityService:
    """Admin subjects and the idle-offload loop around one NatsStateMover; entering it serves, leaving stops."""

    def __init__(
        self,
        nats: NatsClient,
        store: SchedulerStore,
        mover: NatsStateMover,
        *,
        offload_after_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nats = nats
        self._store = store
        self._mover = mover
        self._offload_after_s = offload_after_s
        self._clock = clock
        self._idle = IdleTracker()
        self._snapshots = SnapshotClient(nats)
        self._subscriptions: list[Subscription] = []
        self._loop_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self._mover.start()
        self._subscriptions = [
            await self._nats.subscribe(subjects.SCHED_ADMIN_MIGRATE, queue=QUEUE_GROUP, cb=self._on_migrate),
            await self._nats.subscribe(subjects.SCHED_ADMIN_OFFLOAD, queue=QUEUE_GROUP, cb=self._on_offload),
            await self._nats.subscribe(subjects.SCHED_HEARTBEAT, cb=self._on_heartbeat),
            await self._nats.subscribe(subjects.SCHED_UPDATE, cb=self._on_update),
        ]
        await self._nats.flush()
        self._loop_task = asyncio.create_task(self._offload_idle_forever(), name="offload-idle")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            if not self._nats.is_closed:
                await subscription.unsubscribe()
        await self._mover.close()

    async def migrate(self, request: MigrateSession) -> Message:
        session = await self._store.get_session(request.session_id)
        if session is None or session.worker_id is None or session.status == "closed":
            raise UnknownSession(f"session {request.session_id} is not placed on any worker")
        target = request.target_worker or await self._other_worker(session.worker_id, session.model)
        return await self._mover.migrate(session.session_id, session.worker_id, target, session.epoch, request.reason)

    async def offload(self, request: OffloadRequest) -> Message:
        session = await self._store.get_session(request.session_id)
        if session is None or session.worker_id is None:
            raise UnknownSession(f"session {request.session_id} is not placed on any worker")
        if session.status != "idle":
            raise InvalidState(f"session {request.session_id} is {session.status}; only idle sessions offload")
        ok = await self._mover.offload(session.session_id, session.worker_id, session.epoch, request.reason)
        return Reply(ok=ok, code="" if ok else "offload_refused")

    async def offload_idle(self) -> None:
        """One round of the idle rule; a session that is not idle in PostgreSQL is left where it is."""
        now_s = self._clock()
        for session_id, worker_id in sessions_to_offload(self._idle.quiet(now_s), self._offload_after_s):
            self._idle.restart_clock(session_id, now_s)
            session = await self._store.get_session(session_id)
            if session is None or session.status != "idle" or session.worker_id != worker_id:
                continue
            reason = f"idle for at least {self._offload_after_s} s"
            await self._mover.offload(session_id, worker_id, session.epoch, reason)

    async def _other_worker(self, source: str, model: str) -> str:
        load = await self._store.active_load()
        workers = [w for w in await self._store.list_workers()
                   if w.status == "live" and not w.draining and w.model == model and w.worker_id != source]
        if not workers:
            raise Unavailable(f"no other live worker of model {model!r} to move to")
        return min(workers, key=lambda w: (load.get(w.worker_id, 0) / w.capacity, w.worker_id)).worker_id

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            beat = decode(msg.data, expect=WorkerHeartbeat)
        except TurboServeError:
            return  # the coordinator's own subscription logs bad reports
        assert isinstance(beat, WorkerHeartbeat)
        self._mover.observe(beat)
        self._idle.observe(beat, self._clock())

    async def _on_update(self, msg: Msg) -> None:
        """A closed session's snapshots expire (the state store keeps them for its retention time, then drops)."""
        try:
            update = decode(msg.data, expect=UpdateSession)
            assert isinstance(update, UpdateSession)
            if update.status == "closed":
                await self._snapshots.mark_closed(update.session_id)
        except TurboServeError as exc:
            log.info("event=snapshot_close_failed detail=%s", exc)

    async def _on_migrate(self, msg: Msg) -> None:
        await self._answer(msg, MigrateSession, self.migrate)

    async def _on_offload(self, msg: Msg) -> None:
        await self._answer(msg, OffloadRequest, self.offload)

    async def _answer(self, msg: Msg, kind: type[M], handle: Callable[[M], Awaitable[Message]]) -> None:
        response: Message
        try:
            response = await handle(cast(M, decode(msg.data, expect=kind)))
        except asyncio.CancelledError:
            raise
        except TurboServeError as exc:
            response = Reply(ok=False, code=exc.code, detail=str(exc))
        except Exception:
            log.exception("event=admin_failed subject=%s", msg.subject)
            response = Reply(ok=False, code="internal", detail="the scheduler failed to handle the request")
        if msg.reply:
            await msg.respond(encode(response))

    async def _offload_idle_forever(self) -> None:
        period_s = min(1.0, self._offload_after_s / 2)
        while True:
            await asyncio.sleep(period_s)
            try:
                await self.offload_idle()
            except asyncio.CancelledError:
                raise
            except TurboServeError as exc:
                log.warning("event=offload_round_failed code=%s detail=%r", exc.code, str(exc))
            except Exception:
                log.exception("event=offload_round_failed")
