"""The in-memory SchedulerStore: the same contract as PostgreSQL, for unit tests and the simulator.

Each method runs without awaiting in between its read and its write, so on one event loop it is as atomic
as the SQL statement it stands for.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from services.common.errors import LimitExceeded, StaleEpoch, UnknownSession
from services.common.messages import SessionStatus
from services.scheduler.store.protocol import (
    MAX_LATENCY_SAMPLES,
    SessionExists,
    SessionRecord,
    WorkerRecord,
    WorkerReport,
    open_sessions_limit,
)


class MemoryStore:
    """Sessions and workers in dicts; nothing survives the process."""

    def __init__(self) -> None:
        self._sessions: dict[str, SessionRecord] = {}
        self._workers: dict[str, WorkerRecord] = {}
        self._asks: dict[str, datetime] = {}
        self._learnt: dict[str, tuple[dict[str, Any], datetime]] = {}

    async def insert_session(self, session: SessionRecord, *, max_open_per_owner: int = 0) -> None:
        if session.session_id in self._sessions:
            raise SessionExists(f"session {session.session_id} already exists")
        if max_open_per_owner > 0:
            held = sum(s.owner == session.owner and s.status != "closed" for s in self._sessions.values())
            if held >= max_open_per_owner:
                raise LimitExceeded(open_sessions_limit(held, max_open_per_owner))
        self._sessions[session.session_id] = session

    async def claim_session(
        self, session_id: str, *, owner: str, gateway_id: str, lease_until: datetime | None
    ) -> SessionRecord:
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner or session.status == "closed":
            raise UnknownSession(f"no session {session_id!r} for this token")
        return self._save(dataclasses.replace(session, gateway_id=gateway_id, lease_until=lease_until,
                                              epoch=session.epoch + 1))

    async def record_prompt(self, session_id: str, from_seq: int, prompt: str) -> None:
        session = self._sessions.get(session_id)
        if session is None:
            raise UnknownSession(f"session {session_id} does not exist")
        history = [entry for entry in session.prompt_history if entry[0] != from_seq] + [(from_seq, prompt)]
        self._save(dataclasses.replace(session, prompts=tuple(sorted(history))))

    async def close_abandoned(self, session_id: str, *, lapsed_before: datetime, at: datetime) -> SessionRecord | None:
        session = self._sessions.get(session_id)
        if (session is None or session.status == "closed" or session.lease_until is None
                or session.lease_until >= lapsed_before):
            return None
        self._save(dataclasses.replace(session, status="closed", worker_id=None, updated_at=at))
        return session

    async def renew_leases(self, gateway_id: str, next_seqs: Mapping[str, int], until: datetime) -> int:
        renewed = 0
        for session_id, next_seq in next_seqs.items():
            session = self._sessions.get(session_id)
            if session is None or session.gateway_id != gateway_id or session.status == "closed":
                continue
            self._save(dataclasses.replace(session, lease_until=until, next_seq=max(session.next_seq, next_seq)))
            renewed += 1
        return renewed

    async def get_session(self, session_id: str) -> SessionRecord | None:
        return self._sessions.get(session_id)

    def _fenced(self, session_id: str, expected_epoch: int) -> SessionRecord:
        session = self._sessions.get(session_id)
        if session is None:
            raise UnknownSession(f"session {session_id} does not exist")
        if session.epoch != expected_epoch:
            raise StaleEpoch(f"session {session_id} is at epoch {session.epoch}, not the expected {expected_epoch}")
        return session

    async def set_status(
        self, session_id: str, *, expected_epoch: int, status: SessionStatus, next_seq: int | None, at: datetime
    ) -> SessionRecord:
        session = self._fenced(session_id, expected_epoch)
        seq = session.next_seq if next_seq is None else next_seq
        return self._save(dataclasses.replace(session, status=status, next_seq=seq, updated_at=at))

    async def move_session(
        self, session_id: str, *, expected_epoch: int, worker_id: str, status: SessionStatus, at: datetime
    ) -> SessionRecord:
        session = self._fenced(session_id, expected_epoch)
        return self._save(
            dataclasses.replace(session, worker_id=worker_id, epoch=session.epoch + 1, status=status, updated_at=at)
        )

    async def clear_placement(
        self, session_id: str, *, expected_epoch: int, status: SessionStatus, at: datetime, next_seq: int | None = None
    ) -> SessionRecord:
        session = self._fenced(session_id, expected_epoch)
        seq = session.next_seq if next_seq is None else next_seq
        return self._save(dataclasses.replace(session, worker_id=None, status=status, next_seq=seq, updated_at=at))

    def _save(self, session: SessionRecord) -> SessionRecord:
        self._sessions[session.session_id] = session
        return session

    async def withdraw_unplaced(self, session_id: str) -> bool:
        session = self._sessions.get(session_id)
        if session is None or session.epoch != 0 or session.worker_id is not None:
            return False
        del self._sessions[session_id]
        return True

    async def list_sessions(self, owner: str | None = None) -> list[SessionRecord]:
        open_sessions = [s for s in self._sessions.values()
                         if s.status != "closed" and (owner is None or s.owner == owner)]
        return sorted(open_sessions, key=lambda s: (s.created_at, s.session_id))

    async def record_chunks(self, worker_id: str, chunks: Mapping[str, int], at: datetime) -> int:
        advanced = 0
        for session_id, produced in chunks.items():
            session = self._sessions.get(session_id)
            if session is not None and session.worker_id == worker_id and produced > session.chunks_produced:
                self._save(dataclasses.replace(session, chunks_produced=produced, updated_at=at))
                advanced += 1
        return advanced

    async def upsert_worker(self, report: WorkerReport, at: datetime) -> WorkerRecord:
        previous = self._workers.get(report.worker_id)
        history = (previous.latency_samples if previous else ()) + report.latency_samples
        record = WorkerRecord(
            worker_id=report.worker_id,
            kind=report.kind,
            model=report.model,
            capacity=report.capacity,
            status="live",
            draining=report.draining,
            active_sessions=report.active_sessions,
            latency_samples=history[-MAX_LATENCY_SAMPLES:],
            started_at=report.started_at,
            last_seen=at,
        )
        self._workers[report.worker_id] = record
        return record

    async def retire_worker(self, worker_id: str, status: Literal["lost", "gone"]) -> bool:
        worker = self._workers.get(worker_id)
        if worker is None or worker.status == "gone" or worker.status == status:
            return False
        self._workers[worker_id] = dataclasses.replace(worker, status=status)
        return True

    async def list_workers(self) -> list[WorkerRecord]:
        return sorted(self._workers.values(), key=lambda w: w.worker_id)

    async def save_asks(self, asks: Mapping[str, datetime]) -> None:
        self._asks = dict(asks)

    async def list_asks(self) -> dict[str, datetime]:
        return dict(self._asks)

    async def save_learnt(self, policy: str, state: Mapping[str, Any], at: datetime) -> None:
        self._learnt[policy] = (json.loads(json.dumps(state)), at)  # as JSON would carry it, as PostgreSQL does

    async def load_learnt(self, policy: str) -> tuple[dict[str, Any], datetime] | None:
        return self._learnt.get(policy)

    async def close(self) -> None:
        """Nothing to release."""
