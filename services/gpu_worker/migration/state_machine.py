"""A live migration as an explicit state machine: legal phase changes, a deadline, and rollback at every exit.

PREPARING -> PRECOPYING -> AWAITING_BOUNDARY -> FINAL_COPY -> COMMITTING -> DONE, and from any non-terminal
phase to ROLLED_BACK (undo actions ran) or ABORTED (there was nothing to undo). Each step that takes a resource
registers its undo with ``on_rollback`` (target: drop the device reservation, release the imported slot); a
failure runs them newest first, exactly once.

The watchdog is the deadline: every blocking wait of a migration is bounded by ``remaining_s()`` and every phase
change checks it, so if the peer dies the thread running the migration itself wakes, rolls back (freeing the
target's reservation) and raises, on the thread that owns the model, and no other thread touches the model.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable

from services.gpu_worker.migration.errors import IllegalTransition, MigrationAborted

logger = logging.getLogger(__name__)


class MigrationPhase(enum.Enum):
    PREPARING = "preparing"
    PRECOPYING = "precopying"
    AWAITING_BOUNDARY = "awaiting_boundary"
    FINAL_COPY = "final_copy"
    COMMITTING = "committing"
    DONE = "done"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled_back"


TERMINAL_PHASES = frozenset({MigrationPhase.DONE, MigrationPhase.ABORTED, MigrationPhase.ROLLED_BACK})
_FORWARD: dict[MigrationPhase, MigrationPhase] = {
    MigrationPhase.PREPARING: MigrationPhase.PRECOPYING,
    MigrationPhase.PRECOPYING: MigrationPhase.AWAITING_BOUNDARY,
    MigrationPhase.AWAITING_BOUNDARY: MigrationPhase.FINAL_COPY,
    MigrationPhase.FINAL_COPY: MigrationPhase.COMMITTING,
    MigrationPhase.COMMITTING: MigrationPhase.DONE,
}


class MigrationStateMachine:
    """One side's view of one migration; thread-safe, so another thread may ``request_abort`` or read ``phase``."""

    def __init__(self, migration_id: str, *, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.migration_id = migration_id
        self._clock = clock
        self._deadline = clock() + timeout_s
        self._phase = MigrationPhase.PREPARING
        self._undo: list[Callable[[], None]] = []
        self._abort_reason: str | None = None
        self._lock = threading.Lock()
        self.reason = ""
        self.history: list[tuple[MigrationPhase, float]] = [(self._phase, clock())]
        self.rollback_errors: list[BaseException] = []

    @property
    def phase(self) -> MigrationPhase:
        return self._phase

    def remaining_s(self) -> float:
        """Seconds left before the watchdog deadline; raises MigrationAborted (after rollback) when none are."""
        self._check_live()
        return self._deadline - self._clock()

    def advance(self, phase: MigrationPhase) -> None:
        """Move to the next phase; raises IllegalTransition out of order, MigrationAborted past the deadline.

        DONE records a commit that already happened, so neither the deadline nor an abort request can undo it.
        """
        if phase is not MigrationPhase.DONE:
            self._check_live()
        with self._lock:
            if _FORWARD.get(self._phase) is not phase:  # also refuses any step out of a terminal phase
                raise IllegalTransition(f"migration {self.migration_id}: {self._phase.value} -> {phase.value}")
            self._phase = phase
            self.history.append((phase, self._clock()))
            if phase is MigrationPhase.DONE:
                self._undo.clear()  # committed: nothing left to roll back

    def on_rollback(self, undo: Callable[[], None]) -> None:
        """Register an undo for a resource just taken; if the migration already ended badly, undo it now."""
        with self._lock:
            ended = self._phase in TERMINAL_PHASES
            if not ended:
                self._undo.append(undo)
        if ended:
            undo()
            raise MigrationAborted(f"migration {self.migration_id} already ended ({self._phase.value})")

    def request_abort(self, reason: str) -> None:
        """Ask the migration to stop; the thread running it rolls back at its next phase change or wait."""
        with self._lock:
            self._abort_reason = self._abort_reason or reason

    def fail(self, reason: str) -> MigrationPhase:
        """Run the undo actions newest first and end in ROLLED_BACK (or ABORTED if nothing was taken).

        Idempotent. An undo that raises is logged and kept in ``rollback_errors``; the others still run.
        """
        with self._lock:
            if self._phase in TERMINAL_PHASES:
                return self._phase
            undo, self._undo = self._undo, []
            self._phase = MigrationPhase.ROLLED_BACK if undo else MigrationPhase.ABORTED
            self.reason = reason
            self.history.append((self._phase, self._clock()))
        for action in reversed(undo):
            try:
                action()
            except Exception as exc:  # noqa: BLE001 - every undo must get its chance; errors are kept and logged
                logger.exception("migration %s: rollback step failed", self.migration_id)
                self.rollback_errors.append(exc)
        logger.warning("migration %s ended %s: %s", self.migration_id, self._phase.value, reason)
        return self._phase

    def _check_live(self) -> None:
        with self._lock:
            phase, abort_reason = self._phase, self._abort_reason
        if phase in TERMINAL_PHASES:
            if phase is MigrationPhase.DONE:
                return
            raise MigrationAborted(f"migration {self.migration_id} {phase.value}: {self.reason}")
        if abort_reason is not None:
            self.fail(f"abort requested: {abort_reason}")
            raise MigrationAborted(f"migration {self.migration_id} aborted: {abort_reason}")
        if self._clock() >= self._deadline:
            self.fail("watchdog: deadline passed")
            raise MigrationAborted(f"migration {self.migration_id} passed its deadline")
