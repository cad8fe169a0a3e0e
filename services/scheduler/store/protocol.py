"""What the scheduler keeps durably, behind one interface with an in-memory and a PostgreSQL implementation.

Invariants every implementation keeps (tests/unit/test_scheduler_store_contract.py checks both):
- a session's ``epoch`` grows by exactly one each time it is moved to a worker, and only through
  ``move_session`` with the epoch the caller read, so two schedulers can never both move one session;
- every write that depends on what the caller read is conditional on that epoch and raises StaleEpoch
  when the row moved on, instead of overwriting a newer decision;
- a worker's chunk counts only ever grow, and only the session's current worker can advance them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

from services.common.errors import InvalidState, StaleEpoch, Unavailable, UnknownSession
from services.common.messages import SessionStatus

WorkerStatus = Literal["live", "lost", "gone"]
MAX_LATENCY_SAMPLES = 64
"""Recent (batch size, chunk latency ms) samples kept per worker for the latency model."""

__all__ = [
    "MAX_LATENCY_SAMPLES",
    "SchedulerStore",
    "SessionExists",
    "SessionRecord",
    "StaleEpoch",
    "StoreUnavailable",
    "UnknownSession",
    "WorkerRecord",
    "WorkerReport",
    "WorkerStatus",
]


class SessionExists(InvalidState):
    """A session with this id was already opened."""


class StoreUnavailable(Unavailable):
    """The database cannot be reached right now; the request may be retried."""


def open_sessions_limit(held: int, limit: int) -> str:
    return f"this token already holds {held} sessions (limit {limit}); close one first"


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A session row. ``worker_id`` None means unplaced; ``epoch`` counts placements (1 after the first).
    ``prompts``: the prompt history as (from_seq, prompt), the first at 0 (empty means just ``prompt``);
    ``gateway_id`` holds the client's connection and keeps the lease alive until ``lease_until`` (None: no
    lease, the session is closed only by a request)."""

    session_id: str
    owner: str
    prompt: str
    seed: int
    model: str
    status: SessionStatus
    worker_id: str | None
    epoch: int
    chunks_produced: int
    next_seq: int
    created_at: datetime
    updated_at: datetime
    prompts: tuple[tuple[int, str], ...] = ()
    gateway_id: str | None = None
    lease_until: datetime | None = None

    @property
    def prompt_history(self) -> tuple[tuple[int, str], ...]:
        return self.prompts or ((0, self.prompt),)


@dataclass(frozen=True, slots=True)
class WorkerReport:
    """What one heartbeat says about a worker; ``latency_samples`` are appended to the stored history."""

    worker_id: str
    kind: str
    model: str
    capacity: int
    active_sessions: int
    draining: bool
    started_at: datetime
    latency_samples: tuple[tuple[int, float], ...]


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """A worker row; ``last_seen`` is wall time (liveness itself is judged on a monotonic clock in memory)."""

    worker_id: str
    kind: str
    model: str
    capacity: int
    status: WorkerStatus
    draining: bool
    active_sessions: int
    latency_samples: tuple[tuple[int, float], ...]
    started_at: datetime
    last_seen: datetime


class SchedulerStore(Protocol):
    """Durable sessions, workers, the workers asked for and what the policy learnt. Every method is one atomic
    step; errors are TurboServeError subclasses (StoreUnavailable when the database is down)."""

    async def insert_session(self, session: SessionRecord, *, max_open_per_owner: int = 0) -> None:
        """Persist a new session; raises SessionExists if the id is taken, and LimitExceeded when
        ``max_open_per_owner`` > 0 and its owner already holds that many open sessions (decided atomically, so
        gateways that admit at once cannot overshoot together)."""
        ...

    async def claim_session(
        self, session_id: str, *, owner: str, gateway_id: str, lease_until: datetime | None
    ) -> SessionRecord:
        """Hand an open session of ``owner`` to ``gateway_id`` with epoch + 1, which fences off whatever the
        previous gateway still asks of the worker; UnknownSession when there is none (another owner's session
        looks exactly like a missing one)."""
        ...

    async def record_prompt(self, session_id: str, from_seq: int, prompt: str) -> None:
        """Append to the prompt history (replacing an entry at the same ``from_seq``)."""
        ...

    async def close_abandoned(self, session_id: str, *, lapsed_before: datetime, at: datetime) -> SessionRecord | None:
        """Close the session if its lease ran out before ``lapsed_before`` (a renewal or a claim since then
        keeps it open); returns the row as it was before closing, or None when it was kept."""
        ...

    async def renew_leases(self, gateway_id: str, next_seqs: Mapping[str, int], until: datetime) -> int:
        """Extend the lease of the open sessions ``gateway_id`` still holds, and raise their resume points to
        the given seqs; returns how many rows it renewed."""
        ...

    async def get_session(self, session_id: str) -> SessionRecord | None: ...

    async def set_status(
        self, session_id: str, *, expected_epoch: int, status: SessionStatus, next_seq: int | None, at: datetime
    ) -> SessionRecord:
        """Change status (and the resume point when given) keeping the placement; conditional on the epoch."""
        ...

    async def move_session(
        self, session_id: str, *, expected_epoch: int, worker_id: str, status: SessionStatus, at: datetime
    ) -> SessionRecord:
        """Place the session on ``worker_id`` with epoch + 1, only if its epoch is still ``expected_epoch``."""
        ...

    async def clear_placement(
        self, session_id: str, *, expected_epoch: int, status: SessionStatus, at: datetime, next_seq: int | None = None
    ) -> SessionRecord:
        """Unplace the session (closed, or its worker is gone), keeping the epoch so the next move bumps it;
        ``next_seq`` records how far its client got when the client closed it."""
        ...

    async def withdraw_unplaced(self, session_id: str) -> bool:
        """Delete a session that was never placed (epoch 0, no worker): an open the scheduler refused leaves no
        row behind, so the client may open it again. False when it was placed meanwhile (or is not there)."""
        ...

    async def list_sessions(self, owner: str | None = None) -> list[SessionRecord]:
        """Every session not closed, oldest first: what the control loop's snapshot is built from; only
        ``owner``'s when given (a token's client listing what it may resume or close)."""
        ...

    async def record_chunks(self, worker_id: str, chunks: Mapping[str, int], at: datetime) -> int:
        """Raise chunk counts reported by the sessions' current worker; returns how many sessions advanced."""
        ...

    async def upsert_worker(self, report: WorkerReport, at: datetime) -> WorkerRecord:
        """Record a heartbeat: the worker is live, seen ``at``; its newest samples are kept, oldest dropped."""
        ...

    async def retire_worker(self, worker_id: str, status: Literal["lost", "gone"]) -> bool:
        """Mark a live worker lost, or any worker gone; returns whether its status changed."""
        ...

    async def list_workers(self) -> list[WorkerRecord]: ...

    async def save_asks(self, asks: Mapping[str, datetime]) -> None:
        """Make the record of workers asked for and not given back hold exactly ``asks`` (worker id, or a
        placeholder for a worker whose id is not known until it beats, -> when it was asked for)."""
        ...

    async def list_asks(self) -> dict[str, datetime]:
        """The record ``save_asks`` last wrote."""
        ...

    async def save_learnt(self, policy: str, state: Mapping[str, Any], at: datetime) -> None:
        """Keep what ``policy`` has learnt (plain JSON data) as of ``at``, in place of what it kept before."""
        ...

    async def load_learnt(self, policy: str) -> tuple[dict[str, Any], datetime] | None:
        """What ``save_learnt`` last kept for ``policy``, and when; None when nothing was."""
        ...

    async def close(self) -> None:
        """Release connections; calling it twice is harmless."""
        ...

