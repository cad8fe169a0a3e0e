"""The in-memory SchedulerStore: the same contract as PostgreSQL, for unit tests and the simulator.

Each method runs without awaiting in between its read and its write, so on one event loop it is as atomic
as the SQL statement it stands for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime
from typing import Literal

from services.common.errors import StaleEpoch, UnknownSession
from services.common.messages import SessionStatus
from services.scheduler.store.protocol import (
    MAX_LATENCY_SAMPLES,
    SessionExists,
    SessionRecord,
    WorkerRecord,
    WorkerReport,
)


class MemoryStore:
    """Sessions and workers in dicts; nothing survives the process."""

    def __init__(self) -> None:
        self._sessions: dict[str, SessionRecord] = {}
        self._workers: dict[str, WorkerRecord] = {}

    async def insert_session(self, session: SessionRecord) -> None:
        if session.session_id in self._sessions:
            raise SessionExists(f"session {session.session_id} already exists")
        self._sessions[session.session_id] = session

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

    async def list_sessions(self) -> list[SessionRecord]:
        open_sessions = [s for s in self._sessions.values() if s.status != "closed"]
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

    async def close(self) -> None:
        """Nothing to release."""
