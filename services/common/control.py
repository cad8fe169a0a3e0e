"""Scheduler -> worker commands that move session state (offload, migrate, drain), and the workers' reports back.

Live migration handshake (the scheduler drives it; ownership changes only when PostgreSQL says so):

1. scheduler -> target ``worker_control``: ``PrepareMigration`` -> ``MigrationTicket`` (the target reserved a slot
   and listens for a torch.distributed rendezvous on host:port) or ``Reply(ok=False)``.
2. scheduler -> source ``worker_control``: ``StartMigration`` (with the ticket) -> ``Reply``. The source pre-copies
   the bulk of the state while the session keeps generating, then at a chunk boundary stops the session, sends the
   rows written since plus the small tensors and its replay buffer, and publishes ``MigrationReport``.
3. On ``outcome == "copied"`` the scheduler bumps the epoch in PostgreSQL (conditional update) and publishes the
   new ``Placement``; the gateway re-attaches to the target, which already holds the state; the scheduler then
   sends ``DetachSession`` to the source. Any other outcome, or no report in time: the source resumes (it never
   stopped owning the session) and the target's watchdog frees the reservation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from services.common.wire import Message, message

MigrationOutcome = Literal["copied", "aborted", "failed"]
ScaleAction = Literal["scale_out", "remove"]


@message
@dataclass(frozen=True, slots=True)
class OffloadSession(Message):
    """Move an idle session's state to host memory (or the state store past the host budget); free its slot."""

    TYPE = "offload_session"
    session_id: str
    epoch: int
    reason: str = ""


@message
@dataclass(frozen=True, slots=True)
class PrepareMigration(Message):
    TYPE = "prepare_migration"
    session_id: str
    epoch: int
    source_worker: str
    timeout_s: float = 30.0


@message
@dataclass(frozen=True, slots=True)
class MigrationTicket(Message):
    """Where the target waits for the transfer; the source connects as rank 0, the target is rank 1."""

    TYPE = "migration_ticket"
    session_id: str
    target_worker: str
    host: str
    port: int


@message
@dataclass(frozen=True, slots=True)
class StartMigration(Message):
    TYPE = "start_migration"
    session_id: str
    epoch: int
    target_worker: str
    host: str
    port: int
    reason: str = ""


@message
@dataclass(frozen=True, slots=True)
class MigrationReport(Message):
    """The source's account of one migration; ``next_seq`` is the first chunk the target will generate."""

    TYPE = "migration_report"
    session_id: str
    epoch: int
    source_worker: str
    target_worker: str
    outcome: MigrationOutcome
    next_seq: int = 0
    pause_ms: float = 0.0
    state_bytes: int = 0
    transfer_ms: float = 0.0
    detail: str = ""


@message
@dataclass(frozen=True, slots=True)
class DrainWorker(Message):
    """Stop taking sessions: the scheduler is about to move everything off this worker and remove it."""

    TYPE = "drain_worker"
    worker_id: str
    reason: str = ""


@message
@dataclass(frozen=True, slots=True)
class ProbeWorker(Message):
    """Are you there? Sent to a worker whose heartbeat is late: any answer means alive; NATS answering that
    nobody listens on its control subject means its process is gone (its connection closed)."""

    TYPE = "probe_worker"
    worker_id: str


@message
@dataclass(frozen=True, slots=True)
class ScaleDecision(Message):
    """The scheduler's scaling decision, published on ``subjects.SCHED_SCALE`` for an external provisioner.

    ``scale_out``: add ``count`` workers. ``remove``: stop ``worker_id``, which the scheduler has already drained
    (no session left on it), or cancel a worker still provisioning.
    """

    TYPE = "scale_decision"
    action: ScaleAction
    count: int
    worker_id: str = ""
    reason: str = ""
