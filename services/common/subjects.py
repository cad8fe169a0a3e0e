"""NATS subject names, in one place so no service spells another's subjects by hand.

Request/reply subjects answer with a wire message (Placement or Reply); publish-only subjects are fire and forget
and every consumer fences what it receives by epoch and sequence.
"""

from __future__ import annotations

PREFIX = "ts"

SCHED_OPEN = f"{PREFIX}.sched.open"  # OpenSession -> Placement | Reply
SCHED_UPDATE = f"{PREFIX}.sched.update"  # UpdateSession -> Placement | Reply
SCHED_CLAIM = f"{PREFIX}.sched.claim"  # ClaimSession -> SessionClaim | Reply (a gateway takes a session over)
SCHED_PROMPT = f"{PREFIX}.sched.prompt"  # RecordPrompt -> Reply
SCHED_LIST = f"{PREFIX}.sched.list"  # ListSessions -> SessionList (a token's open sessions, for its client)
SCHED_GATEWAY_LEASE = f"{PREFIX}.sched.gateway_lease"  # GatewayLease (publish)
SCHED_HEARTBEAT = f"{PREFIX}.sched.heartbeat"  # WorkerHeartbeat (publish)
SCHED_WORKER_GONE = f"{PREFIX}.sched.worker_gone"  # WorkerGone (publish)
SCHED_MIGRATION_REPORT = f"{PREFIX}.sched.migration_report"  # MigrationReport (publish, source worker)
SCHED_ADMIN_MIGRATE = f"{PREFIX}.sched.admin.migrate"  # MigrateSession -> MigrationReport | Reply (operators, tests)
SCHED_ADMIN_OFFLOAD = f"{PREFIX}.sched.admin.offload"  # OffloadRequest -> Reply (operators, tests)
SCHED_SCALE = f"{PREFIX}.sched.scale"  # ScaleDecision (publish) for an external provisioner
PLACEMENTS = f"{PREFIX}.placement.*"  # Placement (publish) when the scheduler moves a session on its own


def served_by_scheduler(subject: str) -> bool:
    """A subject of the scheduler's (``ts.sched.*``), which may be between leaders or restarting for a moment."""
    return subject.startswith(f"{PREFIX}.sched.")


def placement(session_id: str) -> str:
    return f"{PREFIX}.placement.{session_id}"


def worker_control(worker_id: str) -> str:
    """AttachSession | ChangePrompt | DetachSession | OffloadSession | StartMigration | DrainWorker -> Reply;
    PrepareMigration -> MigrationTicket | Reply (services.common.control)."""
    return f"{PREFIX}.worker.{worker_id}.control"


def worker_credit(worker_id: str) -> str:
    """RequestChunks (publish): the gateway's credit for a session's next chunks."""
    return f"{PREFIX}.worker.{worker_id}.credit"


def chunks(session_id: str) -> str:
    """Chunk frames of one session (publish, worker -> gateway)."""
    return f"{PREFIX}.chunks.{session_id}"


def check_token(name: str, value: str) -> str:
    """Ids become subject tokens: refuse the characters NATS gives meaning to."""
    if not value or any(ch in value for ch in ". *>\t\r\n") or len(value) > 128:
        raise ValueError(f"{name} {value!r} is not a valid NATS subject token")
    return value
