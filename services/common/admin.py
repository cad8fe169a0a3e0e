"""Operator requests to the scheduler that move session state on demand (subjects.SCHED_ADMIN_*).

They go through the same StateMover as the control loop's own decisions, so a move asked for by hand is fenced by
the epoch in PostgreSQL exactly like one the policy chose.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.wire import Message, message


@message
@dataclass(frozen=True, slots=True)
class MigrateSession(Message):
    """Move a session to ``target_worker`` (empty: the least loaded other live worker of its model)."""

    TYPE = "admin_migrate_session"
    session_id: str
    target_worker: str = ""
    reason: str = "requested by an operator"


@message
@dataclass(frozen=True, slots=True)
class OffloadRequest(Message):
    """Offload an idle session's state from its worker now."""

    TYPE = "admin_offload_session"
    session_id: str
    reason: str = "requested by an operator"
