"""The scheduler's session-state mobility outside the policy: operator requests, and telling the state store
when a session closed (its snapshots then expire).

Idle offloads are not decided here: the closed-loop policy's Offload actions (run by the control loop) are the
only source, so two rules cannot race to move the same session. The runner serves these handlers on NATS.
"""

from __future__ import annotations

import logging
from typing import Protocol

from services.common.admin import MigrateSession, OffloadRequest
from services.common.errors import InvalidState, TurboServeError, UnknownSession
from services.common.messages import Reply, UpdateSession
from services.common.wire import Message
from services.scheduler.state_mover import WorkerStateMover
from services.scheduler.store.protocol import SchedulerStore
from services.state_store.client import SnapshotClient

log = logging.getLogger("turboserve.scheduler.mobility")


class MigrationTargets(Protocol):
    """Where the decider's placement rule would move a session (the control loop answers)."""

    def migration_target(self, session_id: str, source: str, model: str) -> str: ...


class Mobility:
    """Operator migrate and offload requests, and closed sessions' snapshots, around one WorkerStateMover."""

    def __init__(
        self, store: SchedulerStore, mover: WorkerStateMover, snapshots: SnapshotClient, targets: MigrationTargets
    ) -> None:
        self._store = store
        self._mover = mover
        self._snapshots = snapshots
        self._targets = targets

    async def migrate(self, request: MigrateSession) -> Message:
        session = await self._store.get_session(request.session_id)
        if session is None or session.worker_id is None or session.status == "closed":
            raise UnknownSession(f"session {request.session_id} is not placed on any worker")
        target = request.target_worker or self._targets.migration_target(session.session_id, session.worker_id,
                                                                          session.model)
        return await self._mover.migrate(session.session_id, session.worker_id, target, session.epoch, request.reason)

    async def offload(self, request: OffloadRequest) -> Message:
        session = await self._store.get_session(request.session_id)
        if session is None or session.worker_id is None:
            raise UnknownSession(f"session {request.session_id} is not placed on any worker")
        if session.status != "idle":
            raise InvalidState(f"session {request.session_id} is {session.status}; only idle sessions offload")
        ok = await self._mover.offload(session.session_id, session.worker_id, session.epoch, request.reason)
        return Reply(ok=ok, code="" if ok else "offload_refused")

    async def session_updated(self, update: UpdateSession) -> None:
        """A closed session's snapshots expire (the state store keeps them for its retention time, then drops)."""
        if update.status != "closed":
            return
        try:
            await self._snapshots.mark_closed(update.session_id)
        except TurboServeError as exc:
            log.info("event=snapshot_close_failed detail=%s", exc)
