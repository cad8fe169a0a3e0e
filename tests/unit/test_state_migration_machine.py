"""The migration state machine: order, rollback, the watchdog deadline, aborts."""

from __future__ import annotations

import threading

import pytest

from services.gpu_worker.migration.errors import IllegalTransition, MigrationAborted
from services.gpu_worker.migration.state_machine import MigrationPhase, MigrationStateMachine

FORWARD = [MigrationPhase.PRECOPYING, MigrationPhase.AWAITING_BOUNDARY, MigrationPhase.FINAL_COPY,
           MigrationPhase.COMMITTING, MigrationPhase.DONE]


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def test_a_migration_walks_the_phases_in_order_and_forgets_its_undo_once_done() -> None:
    machine = MigrationStateMachine("m", timeout_s=5)
    undone: list[str] = []
    machine.on_rollback(lambda: undone.append("reservation"))
    for phase in FORWARD:
        machine.advance(phase)
    assert machine.phase is MigrationPhase.DONE
    assert machine.fail("late") is MigrationPhase.DONE and undone == []
    assert [phase for phase, _ in machine.history] == [MigrationPhase.PREPARING, *FORWARD]


def test_skipping_a_phase_is_an_illegal_transition() -> None:
    machine = MigrationStateMachine("m", timeout_s=5)
    with pytest.raises(IllegalTransition, match="preparing -> final_copy"):
        machine.advance(MigrationPhase.FINAL_COPY)


def test_a_failure_runs_every_undo_newest_first_exactly_once_and_ends_rolled_back() -> None:
    machine = MigrationStateMachine("m", timeout_s=5)
    undone: list[str] = []
    machine.on_rollback(lambda: undone.append("reservation"))
    machine.advance(MigrationPhase.PRECOPYING)
    machine.on_rollback(lambda: undone.append("slot"))
    assert machine.fail("peer lost") is MigrationPhase.ROLLED_BACK
    assert machine.fail("again") is MigrationPhase.ROLLED_BACK
    assert undone == ["slot", "reservation"] and machine.reason == "peer lost"
    with pytest.raises(MigrationAborted):
        machine.advance(MigrationPhase.AWAITING_BOUNDARY)


def test_a_failure_with_nothing_to_undo_ends_aborted() -> None:
    machine = MigrationStateMachine("m", timeout_s=5)
    assert machine.fail("source refused") is MigrationPhase.ABORTED


def test_an_undo_that_raises_is_recorded_and_the_others_still_run() -> None:
    machine = MigrationStateMachine("m", timeout_s=5)
    undone: list[str] = []

    def broken() -> None:
        raise RuntimeError("release failed")

    machine.on_rollback(lambda: undone.append("reservation"))
    machine.on_rollback(broken)
    machine.fail("boom")
    assert undone == ["reservation"] and [str(e) for e in machine.rollback_errors] == ["release failed"]


def test_the_watchdog_deadline_rolls_back_and_frees_the_reservation() -> None:
    clock = FakeClock()
    machine = MigrationStateMachine("m", timeout_s=30, clock=clock)
    released: list[bool] = []
    machine.on_rollback(lambda: released.append(True))
    machine.advance(MigrationPhase.PRECOPYING)
    assert machine.remaining_s() == pytest.approx(30)
    clock.now_s += 30
    with pytest.raises(MigrationAborted, match="deadline"):
        machine.remaining_s()
    assert released == [True] and machine.phase is MigrationPhase.ROLLED_BACK


def test_an_undo_registered_after_the_end_runs_at_once() -> None:
    machine = MigrationStateMachine("m", timeout_s=5)
    machine.fail("gone")
    released: list[bool] = []
    with pytest.raises(MigrationAborted):
        machine.on_rollback(lambda: released.append(True))
    assert released == [True]


def test_an_abort_requested_from_another_thread_stops_the_migration_at_its_next_step() -> None:
    machine = MigrationStateMachine("m", timeout_s=5)
    machine.advance(MigrationPhase.PRECOPYING)
    requester = threading.Thread(target=machine.request_abort, args=("scheduler cancelled",))
    requester.start()
    requester.join()
    with pytest.raises(MigrationAborted, match="scheduler cancelled"):
        machine.advance(MigrationPhase.AWAITING_BOUNDARY)
    assert machine.phase is MigrationPhase.ABORTED


def test_a_non_positive_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        MigrationStateMachine("m", timeout_s=0)


def test_a_commit_that_landed_reaches_done_even_past_the_deadline() -> None:
    clock = FakeClock()
    machine = MigrationStateMachine("m", timeout_s=30, clock=clock)
    for phase in FORWARD[:-1]:
        machine.advance(phase)
    clock.now_s += 60
    machine.request_abort("too late to matter")
    machine.advance(MigrationPhase.DONE)
    assert machine.phase is MigrationPhase.DONE
