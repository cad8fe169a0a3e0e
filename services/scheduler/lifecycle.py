"""A session's life as the scheduler records it: open, pause, resume, close, a gateway taking it over, its
prompt history and its gateway's lease. Each step is one conditional store transition; where the session goes
is never decided here. Open and resume ask the control loop (the only decider) for a decision that sees the new
row, and answer with what it did; the loop also closes sessions whose lease lapsed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Protocol

from services.common.errors import InvalidState, Unavailable, UnknownSession
from services.common.messages import (
    MAX_LISTED_SESSIONS,
    SUMMARY_PROMPT_CHARS,
    ClaimSession,
    GatewayLease,
    ListSessions,
    OpenSession,
    Placement,
    RecordPrompt,
    Reply,
    SessionClaim,
    SessionList,
    SessionSummary,
    UpdateSession,
)
from services.scheduler.control_loop import log_decision
from services.scheduler.liveness import subject_token, utc_now
from services.scheduler.store.protocol import SchedulerStore, SessionExists, SessionRecord

log = logging.getLogger("turboserve.scheduler")


class NoCapacity(Unavailable):
    """No live worker of the session's model has room; the caller may retry later."""


class Decider(Protocol):
    """What the lifecycle needs of the control loop."""

    def trigger(self, event: str) -> None: ...

    async def decide_for(self, session_id: str, event: str) -> Placement | None: ...

    def unplaced_reason(self, model: str) -> str: ...


class SessionLifecycle:
    """Answers the gateway's open and update requests."""

    def __init__(
        self, store: SchedulerStore, decider: Decider, *, wall_clock: Callable[[], datetime] = utc_now
    ) -> None:
        self._store = store
        self._decider = decider
        self._wall_clock = wall_clock

    async def open(self, request: OpenSession) -> Placement:
        """Record the session unplaced (epoch 0), then let a decision place it. A refused open leaves no row."""
        subject_token("session_id", request.session_id)
        now = self._wall_clock()
        session = SessionRecord(
            session_id=request.session_id, owner=request.owner, prompt=request.prompt, seed=request.seed,
            model=request.model, status="active", worker_id=None, epoch=0, chunks_produced=0, next_seq=0,
            created_at=now, updated_at=now, prompts=((0, request.prompt),),
            gateway_id=request.gateway_id or None, lease_until=self._lease_until(request.lease_s),
        )
        try:
            await self._store.insert_session(session, max_open_per_owner=request.max_open_per_owner)
        except SessionExists:
            existing = await self._store.get_session(request.session_id)
            if existing is None or existing.owner != request.owner or existing.status == "closed":
                raise
            if existing.worker_id is not None:  # a retried open whose first reply was lost
                return Placement(existing.session_id, existing.worker_id, existing.epoch, "already open")
        placed = await self._decider.decide_for(request.session_id, request.TYPE)
        if placed is not None:
            return placed
        row = await self._store.get_session(request.session_id)
        if row is not None and row.worker_id is not None:  # placed by a decision that did not answer this request
            return Placement(row.session_id, row.worker_id, row.epoch, "already open")
        reason = self._decider.unplaced_reason(request.model)
        if not await self._store.withdraw_unplaced(request.session_id):
            row = await self._store.get_session(request.session_id)
            if row is not None and row.worker_id is not None:
                return Placement(row.session_id, row.worker_id, row.epoch, "already open")
        log_decision("refuse", request.session_id, reason)
        raise NoCapacity(reason)

    async def claim(self, request: ClaimSession) -> SessionClaim:
        """Another gateway takes the session over (its client reconnected there, or its gateway died)."""
        row = await self._store.claim_session(request.session_id, owner=request.owner, gateway_id=request.gateway_id,
                                              lease_until=self._lease_until(request.lease_s))
        log_decision("claim", row.session_id, f"gateway {request.gateway_id} takes it over", worker=row.worker_id)
        return SessionClaim(row.session_id, row.seed, row.model, row.status, row.prompt_history, row.next_seq,
                            row.worker_id or "", row.epoch)

    async def list_for_owner(self, request: ListSessions) -> SessionList:
        sessions = await self._store.list_sessions(owner=request.owner)
        listed = sessions[-MAX_LISTED_SESSIONS:]
        return SessionList(tuple(
            SessionSummary(s.session_id, s.status, s.next_seq, s.prompt_history[-1][1][:SUMMARY_PROMPT_CHARS])
            for s in listed
        ), more=len(sessions) - len(listed))

    async def record_prompt(self, request: RecordPrompt) -> Reply:
        await self._store.record_prompt(request.session_id, request.from_seq, request.prompt)
        return Reply(ok=True)

    async def renew_leases(self, lease: GatewayLease) -> None:
        await self._store.renew_leases(lease.gateway_id, lease.next_seqs, self._lease_until(lease.lease_s) or
                                       self._wall_clock())

    def _lease_until(self, lease_s: float) -> datetime | None:
        return self._wall_clock() + timedelta(seconds=lease_s) if lease_s > 0 else None

    async def update(self, request: UpdateSession) -> Placement | Reply:
        session = await self._store.get_session(request.session_id)
        if session is None:
            raise UnknownSession(f"session {request.session_id} does not exist")
        if session.status == "closed":
            if request.status == "closed":
                return Reply(ok=True, detail="already closed")
            raise InvalidState(f"session {request.session_id} is closed and cannot become {request.status}")
        if request.gateway_id and session.gateway_id not in (None, request.gateway_id):
            raise InvalidState(f"session {request.session_id} was taken over by gateway {session.gateway_id}")
        if request.status == "closed":
            await self._store.clear_placement(
                session.session_id, expected_epoch=session.epoch, status="closed", at=self._wall_clock(),
                next_seq=request.next_seq,
            )
            log_decision("close", session.session_id, request.reason or "closed by its client",
                         worker=session.worker_id)
            self._decider.trigger("closed")
            return Reply(ok=True)
        if request.status == "idle":
            return await self._pause(session, request.next_seq)
        return await self._resume(session, request.next_seq)

    async def _pause(self, session: SessionRecord, next_seq: int) -> Placement | Reply:
        updated = await self._store.set_status(
            session.session_id, expected_epoch=session.epoch, status="idle", next_seq=next_seq, at=self._wall_clock()
        )
        log_decision("keep", session.session_id, "paused; its state stays on its worker", worker=updated.worker_id)
        self._decider.trigger("idle")
        if updated.worker_id is None:
            return Reply(ok=True, detail="paused; placed again on resume")
        return Placement(updated.session_id, updated.worker_id, updated.epoch, "paused")

    async def _resume(self, session: SessionRecord, next_seq: int) -> Placement:
        """Active again; the decision keeps it on its worker while that worker is live and has room, else
        places it (a restore). With no room anywhere it goes back to idle and the resume is refused."""
        await self._store.set_status(
            session.session_id, expected_epoch=session.epoch, status="active", next_seq=next_seq,
            at=self._wall_clock(),
        )
        placed = await self._decider.decide_for(session.session_id, "active")
        if placed is not None:
            return placed
        row = await self._store.get_session(session.session_id)
        if row is None or row.status == "closed":
            raise InvalidState(f"session {session.session_id} was closed while it resumed")
        if row.worker_id is not None:
            reason = f"resumed on its worker {row.worker_id}, which is alive"
            log_decision("keep", row.session_id, reason, worker=row.worker_id, epoch=row.epoch)
            return Placement(row.session_id, row.worker_id, row.epoch, reason)
        reason = self._decider.unplaced_reason(row.model)
        await self._store.set_status(row.session_id, expected_epoch=row.epoch, status="idle", next_seq=None,
                                     at=self._wall_clock())
        log_decision("refuse", row.session_id, f"resume: {reason}")
        raise NoCapacity(reason)
