"""What the scheduler's control loop calls to act on a plan: the contract between deciding and doing.

The control loop (closed-loop policy) decides; these Protocols do. ``StateMover`` moves session state between
workers and host memory over NATS (offload, live migration with the epoch commit in PostgreSQL); ``Provisioner``
adds and removes workers (local processes, a Kubernetes StatefulSet, or an external system told by message).
Both are async and idempotent per call; every call carries the decision's reason for logs and spans.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from services.common.control import MigrationReport
from services.common.messages import Placement
from services.common.wire import Message


class WorkerChannel(Protocol):
    """How the scheduler's actors reach workers and gateways; the runner implements it over NATS."""

    async def ask_worker(self, worker_id: str, request: Message) -> Message | None:
        """A worker's answer to a control message, or None when it did not answer in time (the caller treats that
        as a refusal)."""
        ...

    async def publish_placement(self, placement: Placement) -> None:
        """Tell the session's gateway where the session now lives."""
        ...


class StateMover(Protocol):
    async def offload(self, session_id: str, worker_id: str, epoch: int, reason: str) -> bool:
        """Tell the worker to move the idle session's state to host memory; True when it acknowledged."""
        ...

    async def migrate(self, session_id: str, source: str, target: str, epoch: int, reason: str) -> MigrationReport:
        """Live-migrate an active or idle session; on ``outcome == "copied"`` the epoch is bumped in PostgreSQL,
        the new placement published and the source detached before this returns. Never raises for a failed
        migration: the report says what happened and the session stays with its source."""
        ...


class Provisioner(Protocol):
    """Adds and removes workers. A worker asked for is usable only once it heart-beats (provisioning delay)."""

    async def scale_out(self, count: int, reason: str) -> Sequence[str]:
        """Ask for ``count`` more workers; returns the ids they will register under (may be empty if unknown)."""
        ...

    async def remove(self, worker_id: str, reason: str) -> None:
        """Stop a drained worker (the caller has already moved every session off it)."""
        ...

    async def parked(self) -> frozenset[str]:
        """Workers it removed that keep running until it can stop them (a StatefulSet's pods below its top): they
        stay out of the pool until ``scale_out`` takes them back. Asked of the cluster, not remembered, so a
        restarted scheduler knows them too."""
        ...

    async def close(self) -> None:
        """Release what the provisioner holds (child processes it started are stopped)."""
        ...
