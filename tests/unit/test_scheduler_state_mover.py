"""The scheduler's StateMover against the in-memory store and a scripted NATS: what each answer of
the workers leads to (epoch bump, placement, detach) without any socket."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

from services.common import subjects
from services.common.control import (
    MigrationReport,
    MigrationTicket,
    OffloadSession,
    PrepareMigration,
    StartMigration,
)
from services.common.messages import DetachSession, Placement, Reply
from services.common.wire import Message
from services.scheduler.state_mover import WorkerStateMover
from services.scheduler.store.memory import MemoryStore
from services.scheduler.store.protocol import SessionRecord

AT = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)


class ScriptedWorkers:
    """A WorkerChannel answering control requests with ``answer(worker, request)``; a source that accepts
    StartMigration reports ``report_outcome`` right after, as a real one does when the copy ends."""

    def __init__(self, answer: Callable[[str, Message], Message | None], report_outcome: str | None = "copied") -> None:
        self._answer = answer
        self._report_outcome = report_outcome
        self.requests: list[tuple[str, Message]] = []
        self.published: list[tuple[str, Message]] = []
        self.mover: WorkerStateMover | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def publish_placement(self, placement: Placement) -> None:
        self.published.append((subjects.placement(placement.session_id), placement))

    async def ask_worker(self, worker: str, request: Message) -> Message | None:
        self.requests.append((worker, request))
        answer = self._answer(worker, request)
        if isinstance(request, StartMigration) and isinstance(answer, Reply) and answer.ok and self._report_outcome:
            report = MigrationReport(request.session_id, request.epoch, worker, request.target_worker,
                                     self._report_outcome, next_seq=9, pause_ms=12.0)  # type: ignore[arg-type]
            task = asyncio.create_task(self._report(report))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return answer

    async def _report(self, report: MigrationReport) -> None:
        assert self.mover is not None
        self.mover.on_report(report)


def willing(worker: str, request: Message) -> Message:
    if isinstance(request, PrepareMigration):
        return MigrationTicket(request.session_id, worker, "127.0.0.1", 4242)
    return Reply(ok=True)


async def stored(store: MemoryStore, *, status: str = "active", epoch: int = 1) -> MemoryStore:
    await store.insert_session(SessionRecord(
        session_id="s1", owner="o", prompt="p", seed=1, model="tiny", status=status,  # type: ignore[arg-type]
        worker_id="w1", epoch=epoch, chunks_produced=0, next_seq=0, created_at=AT, updated_at=AT,
    ))
    return store


async def mover_with(nats: ScriptedWorkers, store: MemoryStore) -> WorkerStateMover:
    mover = WorkerStateMover(nats, store, migration_timeout_s=0.2, report_slack_s=0.0, wall_clock=lambda: AT)
    nats.mover = mover
    return mover


async def test_a_copied_migration_bumps_the_epoch_publishes_the_placement_then_detaches_the_source() -> None:
    store = await stored(MemoryStore())
    nats = ScriptedWorkers(willing)
    report = await (await mover_with(nats, store)).migrate("s1", "w1", "w2", 1, "rebalance")
    assert report.outcome == "copied" and report.pause_ms == 12.0
    session = await store.get_session("s1")
    assert session is not None and (session.worker_id, session.epoch) == ("w2", 2)
    assert nats.published == [(subjects.placement("s1"), Placement("s1", "w2", 2, "migrated: rebalance"))]
    assert [(w, type(r)) for w, r in nats.requests] == [
        ("w2", PrepareMigration), ("w1", StartMigration), ("w1", DetachSession)]


async def test_a_migration_the_target_refuses_changes_nothing() -> None:
    store = await stored(MemoryStore())
    nats = ScriptedWorkers(lambda w, r: Reply(ok=False, code="unavailable", detail="full"))
    report = await (await mover_with(nats, store)).migrate("s1", "w1", "w2", 1, "rebalance")
    assert report.outcome == "failed" and "target refused" in report.detail
    session = await store.get_session("s1")
    assert session is not None and (session.worker_id, session.epoch) == ("w1", 1) and not nats.published


async def test_a_copy_whose_epoch_moved_meanwhile_is_not_committed_and_the_target_copy_is_dropped() -> None:
    store = await stored(MemoryStore())
    nats = ScriptedWorkers(willing)
    mover = await mover_with(nats, store)
    await store.move_session("s1", expected_epoch=1, worker_id="w3", status="active", at=AT)  # worker lost meanwhile
    report = await mover.migrate("s1", "w1", "w2", 1, "rebalance")
    assert report.outcome == "failed" and "not committed" in report.detail
    assert ("w2", DetachSession("s1", 1)) in nats.requests and not nats.published


async def test_a_migration_without_a_report_places_the_session_on_its_source_again_under_a_new_epoch() -> None:
    store = await stored(MemoryStore())
    nats = ScriptedWorkers(willing, report_outcome=None)  # the source accepted, then went silent
    report = await (await mover_with(nats, store)).migrate("s1", "w1", "w2", 1, "rebalance")
    assert report.outcome == "failed" and "no report" in report.detail
    session = await store.get_session("s1")
    assert session is not None and (session.worker_id, session.epoch) == ("w1", 2)
    assert nats.published == [(subjects.placement("s1"),
                               Placement("s1", "w1", 2, "migration undecided: placed on its source again"))]
    assert nats.requests[-1] == ("w2", DetachSession("s1", 1))


async def test_a_source_lost_before_it_reports_ends_the_wait_at_once_and_leaves_the_session_to_be_placed_anew(
) -> None:
    store = await stored(MemoryStore())
    nats = ScriptedWorkers(willing, report_outcome=None)  # the source accepted, then was killed
    mover = WorkerStateMover(nats, store, migration_timeout_s=60.0, wall_clock=lambda: AT)
    migration = asyncio.create_task(mover.migrate("s1", "w1", "w2", 1, "rebalance"))
    while not any(isinstance(r, StartMigration) for _, r in nats.requests):
        await asyncio.sleep(0.01)
    mover.worker_lost("w2")  # another worker's loss ends nothing
    await asyncio.sleep(0.05)
    assert not migration.done()
    mover.worker_lost("w1")
    async with asyncio.timeout(1.0):  # not the 65 s report deadline
        report = await migration
    assert report.outcome == "failed" and "source was lost" in report.detail
    session = await store.get_session("s1")
    assert session is not None and (session.worker_id, session.epoch) == ("w1", 1) and not nats.published
    assert nats.requests[-1] == ("w2", DetachSession("s1", 1))


class SilentWorkers(ScriptedWorkers):
    """Workers that take a request and never answer it (frozen, or killed after it arrived)."""

    def __init__(self) -> None:
        super().__init__(willing)

    async def ask_worker(self, worker: str, request: Message) -> Message | None:
        self.requests.append((worker, request))
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_request_to_a_worker_lost_meanwhile_ends_unanswered_and_a_later_one_is_sent() -> None:
    store = await stored(MemoryStore(), status="idle")
    nats = SilentWorkers()
    mover = await mover_with(nats, store)
    offload = asyncio.create_task(mover.offload("s1", "w1", 1, "idle"))
    await asyncio.sleep(0.05)
    mover.worker_lost("w1")
    async with asyncio.timeout(1.0):
        assert await offload is False
    again = asyncio.create_task(mover.offload("s1", "w1", 1, "idle"))  # the loss ended only the waits it found
    await asyncio.sleep(0.05)
    assert not again.done() and len(nats.requests) == 2
    again.cancel()


async def test_an_offloaded_session_moves_by_snapshot_without_a_live_transfer() -> None:
    store = await stored(MemoryStore(), status="idle")
    nats = ScriptedWorkers(willing)
    mover = await mover_with(nats, store)
    assert await mover.offload("s1", "w1", 1, "idle")
    report = await mover.migrate("s1", "w1", "w2", 1, "resume elsewhere")
    assert report.outcome == "copied" and "snapshot" in report.detail
    assert [type(r) for _, r in nats.requests] == [OffloadSession, DetachSession]
    session = await store.get_session("s1")
    assert session is not None and (session.worker_id, session.epoch, session.status) == ("w2", 2, "idle")
