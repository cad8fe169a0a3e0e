"""The scheduler's session-state mobility outside the policy: operator requests, and telling the state store
when a session closed (its snapshots then expire).

Idle offloads are not decided here: the closed-loop policy's Offload actions (run by the control loop) are the
only source, so two rules cannot race to move the same session.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Self

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro.service import Service

from services.common import subjects
from services.common.admin import MigrateSession, OffloadRequest
from services.common.endpoints import Endpoint, serve
from services.common.errors import (
    InvalidState,
    TurboServeError,
    Unavailable,
    UnknownSession,
)
from services.common.messages import Reply, UpdateSession, WorkerHeartbeat
from services.common.wire import Message, decode
from services.scheduler.state_mover import NatsStateMover
from services.scheduler.store.protocol import SchedulerStore
from services.state_store.client import SnapshotClient

log = logging.getLogger("turboserve.scheduler.mobility")
QUEUE_GROUP = "turboserve-scheduler-admin"


class MobilityService:
    """Admin subjects around one NatsStateMover; entering it serves, leaving stops."""

    def __init__(self, nats: NatsClient, store: SchedulerStore, mover: NatsStateMover) -> None:
        self._nats = nats
        self._store = store
        self._mover = mover
        self._snapshots = SnapshotClient(nats)
        self._subscriptions: list[Subscription] = []
        self._service: Service | None = None

    async def __aenter__(self) -> Self:
        await self._mover.start()
        self._service = await serve(self._nats, service="scheduler_admin", description="operator moves",
                                    endpoints=[
                                        Endpoint.typed("migrate", subjects.SCHED_ADMIN_MIGRATE, MigrateSession,
                                                       self.migrate),
                                        Endpoint.typed("offload", subjects.SCHED_ADMIN_OFFLOAD, OffloadRequest,
                                                       self.offload),
                                    ], queue_group=QUEUE_GROUP, log=log)
        self._subscriptions = [
            await self._nats.subscribe(subjects.SCHED_HEARTBEAT, cb=self._on_heartbeat),
            await self._nats.subscribe(subjects.SCHED_UPDATE, cb=self._on_update),
        ]
        await self._nats.flush()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        service, self._service = self._service, None
        if service is not None and not self._nats.is_closed:
            await service.stop()
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

    async def _on_update(self, msg: Msg) -> None:
        """A closed session's snapshots expire (the state store keeps them for its retention time, then drops)."""
        try:
            update = decode(msg.data, expect=UpdateSession)
            assert isinstance(update, UpdateSession)
            if update.status == "closed":
                await self._snapshots.mark_closed(update.session_id)
        except TurboServeError as exc:
            log.info("event=snapshot_close_failed detail=%s", exc)
