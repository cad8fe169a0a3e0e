"""The scheduler on real NATS and PostgreSQL; workers and gateways are played by in-test publishers and requesters."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from services.common import subjects
from services.common.admin import MigrateSession
from services.common.control import MigrationReport, MigrationTicket, PrepareMigration, ScaleDecision, StartMigration
from services.common.messages import OpenSession, Placement, Reply, UpdateSession, WorkerGone, WorkerHeartbeat
from services.common.wire import Message, decode, encode
from services.scheduler.control_settings import ControlSettings
from services.scheduler.migrations import migrate
from services.scheduler.runner import open_scheduler
from services.scheduler.settings import SchedulerSettings
from services.scheduler.store.postgres import PostgresStore
from services.scheduler.store.protocol import SessionRecord
from tests.integration.test_scheduler_postgres import empty_tables, scheduler_database_url

pytestmark = pytest.mark.integration
__all__ = ["scheduler_database_url"]  # re-exported so pytest finds the fixture: a database of this module's own

HEARTBEAT_INTERVAL_S = 0.1
WORKER_TIMEOUT_S = 0.5
T = TypeVar("T")


async def eventually(probe: Callable[[], Awaitable[T | None]], *, timeout_s: float = 5.0) -> T:
    """Poll ``probe`` until it returns something truthy, failing after a deadline (never a fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.02)


async def is_live(db: PostgresStore, worker_id: str) -> bool:
    """The scheduler has recorded the worker live."""
    return any(w.worker_id == worker_id and w.status == "live" for w in await db.list_workers())


class FakeWorker:
    """A worker as the scheduler sees it: heartbeats on a timer until stopped, and answers on its control subject
    until closed. Stopped but not closed, it is a frozen or cut-off worker: only the heartbeat timeout finds it."""

    def __init__(self, nc: NatsClient, worker_id: str, model: str, *, capacity: int = 4,
                 answer: Callable[[Message], Message] = lambda request: Reply(ok=True)) -> None:
        self.nc, self.worker_id, self.model, self.capacity = nc, worker_id, model, capacity
        self._answer = answer
        self.chunks: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._control: Subscription | None = None

    def heartbeat(self) -> WorkerHeartbeat:
        return WorkerHeartbeat(worker_id=self.worker_id, kind="cpu", model=self.model, capacity=self.capacity,
                               sessions=dict(self.chunks), recent_batches=((1, 42.0),), started_at_s=time.time())

    async def _beat_forever(self) -> None:
        while True:
            await self.nc.publish(subjects.SCHED_HEARTBEAT, encode(self.heartbeat()))
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def start(self) -> None:
        async def answer(msg: Msg) -> None:
            await msg.respond(encode(self._answer(decode(msg.data))))

        self._control = await self.nc.subscribe(subjects.worker_control(self.worker_id), cb=answer)
        self._task = asyncio.create_task(self._beat_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def close(self) -> None:
        await self.stop()
        if self._control is not None:
            await self._control.unsubscribe()
            self._control = None


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NatsClient]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


@pytest.fixture
async def db(scheduler_database_url: str) -> AsyncIterator[PostgresStore]:
    """The database as a bystander reads it; migrated and emptied before each test."""
    await migrate(scheduler_database_url)
    empty_tables(scheduler_database_url)
    store = PostgresStore.connect(scheduler_database_url, pool_size=2)
    yield store
    await store.close()


@pytest.fixture
def settings(scheduler_database_url: str, nats_url: str) -> SchedulerSettings:
    return SchedulerSettings(nats_url=nats_url, database_url=scheduler_database_url,
                             worker_timeout_s=WORKER_TIMEOUT_S, sweep_interval_s=0.05)


@pytest.fixture
async def workers(nc: NatsClient, db: PostgresStore) -> AsyncIterator[Callable[..., Awaitable[FakeWorker]]]:
    """Start fake workers and wait until the scheduler has recorded them live."""
    started: list[FakeWorker] = []

    async def start(worker_id: str, model: str, **kwargs: Any) -> FakeWorker:
        worker = FakeWorker(nc, worker_id, model, **kwargs)
        await worker.start()
        started.append(worker)

        await eventually(lambda: is_live(db, worker_id))
        return worker

    yield start
    for worker in started:
        await worker.close()


async def request(nc: NatsClient, subject: str, message: Message) -> Message:
    return decode((await nc.request(subject, encode(message), timeout=5)).data)


def an_open(model: str, session_id: str | None = None) -> OpenSession:
    return OpenSession(session_id=session_id or uuid.uuid4().hex, owner="owner-hash", prompt="a red fox running",
                       seed=3, model=model)


def a_model() -> str:
    return f"m-{uuid.uuid4().hex[:8]}"


async def row(db: PostgresStore, session_id: str) -> SessionRecord:
    record = await db.get_session(session_id)
    assert record is not None
    return record


async def test_open_places_sessions_by_the_closed_loop_rule_filling_one_worker_while_it_meets_the_target(
    nc: NatsClient, db: PostgresStore, settings: SchedulerSettings, workers: Callable[..., Awaitable[FakeWorker]]
) -> None:
    model = a_model()
    async with open_scheduler(settings, nc):
        await workers("wa", model)
        await workers("wb", model)
        replies = [await request(nc, subjects.SCHED_OPEN, an_open(model, f"s{i}")) for i in range(4)]
        assert all(isinstance(r, Placement) and r.epoch == 1 for r in replies)
        chosen = {r.worker_id for r in replies if isinstance(r, Placement)}
        assert len(chosen) == 1 and chosen <= {"wa", "wb"}  # best fit: 4 of K = 4 still meet 400 ms per chunk
        stored = await row(db, "s0")
        assert (stored.status, stored.epoch, stored.model) == ("active", 1, model)
        assert isinstance(replies[0], Placement) and stored.worker_id == replies[0].worker_id
        assert stored.created_at.tzinfo is not None


async def test_open_with_no_worker_for_the_model_is_answered_unavailable(
    nc: NatsClient, db: PostgresStore, settings: SchedulerSettings
) -> None:
    async with open_scheduler(settings, nc):
        reply = await request(nc, subjects.SCHED_OPEN, an_open(a_model(), "lonely"))
    assert isinstance(reply, Reply) and (reply.ok, reply.code) == (False, "unavailable")
    assert "no live worker serves model" in reply.detail
    assert await db.get_session("lonely") is None


async def test_a_malformed_request_gets_an_error_reply_and_the_scheduler_keeps_serving(
    nc: NatsClient, db: PostgresStore, settings: SchedulerSettings
) -> None:
    async with open_scheduler(settings, nc):
        garbage = decode((await nc.request(subjects.SCHED_OPEN, b"\xc1not msgpack", timeout=5)).data)
        unknown = await request(nc, subjects.SCHED_UPDATE, UpdateSession("nobody", "idle", next_seq=0))
    assert isinstance(garbage, Reply) and garbage.code == "malformed"
    assert isinstance(unknown, Reply) and unknown.code == "unknown_session"


async def test_pause_and_resume_keep_the_placement_and_chunk_counts_come_from_heartbeats(
    nc: NatsClient, db: PostgresStore, settings: SchedulerSettings, workers: Callable[..., Awaitable[FakeWorker]]
) -> None:
    model = a_model()
    async with open_scheduler(settings, nc):
        worker = await workers("wp", model)
        opened = await request(nc, subjects.SCHED_OPEN, an_open(model, "sp"))
        worker.chunks["sp"] = 5

        async def counted() -> bool:
            return (await row(db, "sp")).chunks_produced == 5

        await eventually(counted)
        paused = await request(nc, subjects.SCHED_UPDATE, UpdateSession("sp", "idle", next_seq=5))
        assert (await row(db, "sp")).status == "idle"
        resumed = await request(nc, subjects.SCHED_UPDATE, UpdateSession("sp", "active", next_seq=5))
        closed = await request(nc, subjects.SCHED_UPDATE, UpdateSession("sp", "closed", next_seq=7))
    assert isinstance(opened, Placement) and (opened.worker_id, opened.epoch) == ("wp", 1)
    assert isinstance(paused, Placement) and (paused.worker_id, paused.epoch) == ("wp", 1)
    assert isinstance(resumed, Placement) and (resumed.worker_id, resumed.epoch) == ("wp", 1)
    assert closed == Reply(ok=True)
    final = await row(db, "sp")
    assert (final.status, final.worker_id, final.next_seq) == ("closed", None, 7)  # how far its client got


@contextlib.asynccontextmanager
async def placements_published(nc: NatsClient) -> AsyncIterator[asyncio.Queue[Placement]]:
    """What a gateway would hear on the placement wildcard while the block runs."""
    heard: asyncio.Queue[Placement] = asyncio.Queue()

    async def on_placement(msg: Msg) -> None:
        placement = decode(msg.data, expect=Placement)
        assert isinstance(placement, Placement)
        heard.put_nowait(placement)

    subscription = await nc.subscribe(subjects.PLACEMENTS, cb=on_placement)
    try:
        yield heard
    finally:
        await subscription.unsubscribe()


async def test_a_worker_that_stops_heartbeating_is_lost_and_its_active_sessions_move_with_a_bumped_epoch(
    nc: NatsClient, db: PostgresStore, settings: SchedulerSettings, workers: Callable[..., Awaitable[FakeWorker]]
) -> None:
    model = a_model()
    async with open_scheduler(settings, nc), placements_published(nc) as heard:
        doomed = await workers("w-doomed", model)
        await request(nc, subjects.SCHED_OPEN, an_open(model, "busy"))
        await request(nc, subjects.SCHED_OPEN, an_open(model, "resting"))
        await request(nc, subjects.SCHED_UPDATE, UpdateSession("resting", "idle", next_seq=4))
        await workers("w-spare", model)
        stopped_at_s = time.monotonic()
        await doomed.stop()
        placement = await asyncio.wait_for(heard.get(), timeout=5)
        noticed_after_s = time.monotonic() - stopped_at_s

        async def resting_let_go() -> bool:  # the same decision's next action; the busy one's placement came first
            return (await row(db, "resting")).worker_id is None

        await eventually(resting_let_go)
    assert placement == Placement("busy", "w-spare", 2, "worker w-doomed lost")
    # its last heartbeat went out up to one interval before it stopped; the bound above is generous for 2 busy cores
    assert WORKER_TIMEOUT_S - HEARTBEAT_INTERVAL_S <= noticed_after_s < WORKER_TIMEOUT_S + 2.0
    busy, resting = await row(db, "busy"), await row(db, "resting")
    assert (busy.worker_id, busy.epoch, busy.status) == ("w-spare", 2, "active")
    assert (resting.worker_id, resting.epoch, resting.status) == (None, 1, "idle")
    assert {w.worker_id: w.status for w in await db.list_workers()} == {"w-doomed": "lost", "w-spare": "live"}


async def test_a_worker_that_says_it_is_gone_has_its_sessions_moved_at_once(
    nc: NatsClient, db: PostgresStore, settings: SchedulerSettings, workers: Callable[..., Awaitable[FakeWorker]]
) -> None:
    model = a_model()
    long_timeout = SchedulerSettings(nats_url=settings.nats_url, database_url=settings.database_url,
                                     worker_timeout_s=60.0, sweep_interval_s=1.0)
    async with open_scheduler(long_timeout, nc), placements_published(nc) as heard:
        leaving = await workers("w-leaving", model)
        await request(nc, subjects.SCHED_OPEN, an_open(model, "mover"))
        await workers("w-staying", model)
        await leaving.stop()
        await nc.publish(subjects.SCHED_WORKER_GONE, encode(WorkerGone("w-leaving")))
        placement = await asyncio.wait_for(heard.get(), timeout=5)
    assert placement == Placement("mover", "w-staying", 2, "worker w-leaving gone")


async def test_a_restarted_scheduler_reads_sessions_and_workers_back_from_postgres(
    nc: NatsClient, db: PostgresStore, settings: SchedulerSettings, workers: Callable[..., Awaitable[FakeWorker]]
) -> None:
    model = a_model()
    async with open_scheduler(settings, nc):
        first = await workers("w-first", model)
        opened = await request(nc, subjects.SCHED_OPEN, an_open(model, "kept"))
        await request(nc, subjects.SCHED_UPDATE, UpdateSession("kept", "idle", next_seq=8))
    assert isinstance(opened, Placement) and opened.worker_id == "w-first"
    restarted_at = datetime.now(UTC)
    async with open_scheduler(settings, nc), placements_published(nc) as heard:
        resumed = await request(nc, subjects.SCHED_UPDATE, UpdateSession("kept", "active", next_seq=8))
        assert isinstance(resumed, Placement) and (resumed.worker_id, resumed.epoch) == ("w-first", 1)
        await workers("w-second", model)

        async def first_heard_again() -> bool:  # new sessions only go to workers this scheduler has heard
            return any(w.worker_id == "w-first" and w.last_seen > restarted_at for w in await db.list_workers())

        await eventually(first_heard_again)
        other = await request(nc, subjects.SCHED_OPEN, an_open(model, "new"))
        assert isinstance(other, Placement) and other.worker_id == "w-first"  # best fit beside "kept", read back
        await first.stop()
        placement = await asyncio.wait_for(heard.get(), timeout=5)
    assert placement == Placement("kept", "w-second", 2, "worker w-first lost")
    kept = await row(db, "kept")
    assert (kept.status, kept.next_seq, kept.prompt) == ("active", 8, "a red fox running")


async def test_a_restarted_scheduler_takes_back_the_workers_asked_for_and_what_its_policy_learnt(
    nc: NatsClient, db: PostgresStore, settings: SchedulerSettings, workers: Callable[..., Awaitable[FakeWorker]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TURBOSERVE_CONTROL_PERIOD_S", "0.1")  # many decisions in the second's watch below
    policy = ControlSettings().policy
    asked: asyncio.Queue[ScaleDecision] = asyncio.Queue()

    async def on_scale(msg: Msg) -> None:
        decision = decode(msg.data)
        if isinstance(decision, ScaleDecision) and decision.action == "scale_out":
            asked.put_nowait(decision)

    subscription = await nc.subscribe(subjects.SCHED_SCALE, cb=on_scale)
    model = a_model()
    try:
        async with open_scheduler(settings, nc):
            await workers("w-only", model)
            assert isinstance(await request(nc, subjects.SCHED_OPEN, an_open(model, "first")), Placement)
            first = await asyncio.wait_for(asked.get(), timeout=5)  # a warm spare beside the busy worker
            await asyncio.sleep(0.3)
        stopped_at = datetime.now(UTC)
        asked_for = first.count + sum(asked.get_nowait().count for _ in range(asked.qsize()))
        recorded = await db.list_asks()
        assert len(recorded) == asked_for and all(w.startswith("pending-") for w in recorded)
        learnt = await db.load_learnt(policy)
        assert learnt is not None and learnt[0]["autoscale"]["open"]["open"]  # rises it was following

        async with open_scheduler(settings, nc):  # the spare is still starting when the next scheduler begins

            async def decided_again() -> bool:
                kept = await db.load_learnt(policy)
                return kept is not None and kept[1] > stopped_at

            await eventually(decided_again)
            await asyncio.sleep(1.0)
            assert asked.empty(), f"asked again: {asked.get_nowait()}"
            assert await db.list_asks() == recorded
    finally:
        await subscription.unsubscribe()


async def test_a_worker_whose_process_is_gone_is_lost_long_before_its_heartbeat_timeout(
    nc: NatsClient, db: PostgresStore, settings: SchedulerSettings
) -> None:
    model = a_model()
    patient = SchedulerSettings(nats_url=settings.nats_url, database_url=settings.database_url,
                                worker_timeout_s=30.0, sweep_interval_s=0.05)
    vanished, other = FakeWorker(nc, "w-vanished", model), FakeWorker(nc, "w-other", model)

    async def beat_without_answering(stop: asyncio.Event) -> None:
        while not stop.is_set():  # nobody listens on this worker's control subject: a probe finds that out
            await nc.publish(subjects.SCHED_HEARTBEAT, encode(vanished.heartbeat()))
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    stop_vanished = asyncio.Event()
    async with open_scheduler(patient, nc), placements_published(nc) as heard:
        beater = asyncio.create_task(beat_without_answering(stop_vanished))
        await eventually(lambda: is_live(db, "w-vanished"))
        await request(nc, subjects.SCHED_OPEN, an_open(model, "orphan"))
        await other.start()  # it answers probes: a late beat on a loaded machine must not lose it as well
        await eventually(lambda: is_live(db, "w-other"))
        await asyncio.sleep(5 * HEARTBEAT_INTERVAL_S)  # enough beats for the scheduler to learn their interval
        stopped_at_s = time.monotonic()
        stop_vanished.set()
        placement = await asyncio.wait_for(heard.get(), timeout=10)
        noticed_after_s = time.monotonic() - stopped_at_s
        await other.close()
        await beater
    assert placement == Placement("orphan", "w-other", 2, "worker w-vanished lost")
    assert noticed_after_s < 3.0, f"noticed after {noticed_after_s:.1f} s; the timeout alone would take 30 s"


async def test_a_migration_whose_source_dies_before_reporting_ends_when_the_source_is_found_lost(
    nc: NatsClient, settings: SchedulerSettings, workers: Callable[..., Awaitable[FakeWorker]]
) -> None:
    """Not at the report deadline (35 s): a decision waits on each migration it makes, so until then none would
    be taken, the dead source's sessions' new homes among them."""
    model = a_model()
    started = asyncio.Event()

    def source_answer(request: Message) -> Message:
        if isinstance(request, StartMigration):
            started.set()
        return Reply(ok=True)

    def target_answer(request: Message) -> Message:
        if isinstance(request, PrepareMigration):
            return MigrationTicket(request.session_id, "w-target", "127.0.0.1", 9)
        return Reply(ok=True)

    async with open_scheduler(settings, nc), placements_published(nc) as heard:
        source = await workers("w-source", model, answer=source_answer)
        await request(nc, subjects.SCHED_OPEN, an_open(model, "moving"))
        await workers("w-target", model, answer=target_answer)
        migration = asyncio.ensure_future(nc.request(subjects.SCHED_ADMIN_MIGRATE,
                                                     encode(MigrateSession("moving", "w-target")), timeout=30))
        await asyncio.wait_for(started.wait(), timeout=5)
        killed_at_s = time.monotonic()
        await source.close()  # killed with the copy under way: no report will come
        report = decode((await migration).data)
        ended_after_s = time.monotonic() - killed_at_s
        placement = await asyncio.wait_for(heard.get(), timeout=5)
    assert isinstance(report, MigrationReport) and report.outcome == "failed", report
    assert "source was lost" in report.detail
    assert ended_after_s < WORKER_TIMEOUT_S + 2.0, f"ended {ended_after_s:.1f} s after the kill"
    assert placement == Placement("moving", "w-target", 2, "worker w-source lost")


async def test_a_slow_database_delays_the_worker_rows_but_never_makes_a_beating_worker_lost(
    nc: NatsClient, db: PostgresStore, settings: SchedulerSettings, workers: Callable[..., Awaitable[FakeWorker]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each heartbeat's row write takes three heartbeat intervals: beats that queued behind the writes restarted
    the workers' timeouts late, until live workers were marked lost. Now a beat restarts its timeout on arrival and
    only the newest beat per worker waits for the database."""
    upsert = PostgresStore.upsert_worker

    async def slow_upsert(self: PostgresStore, *args: object, **kwargs: object) -> object:
        await asyncio.sleep(3 * HEARTBEAT_INTERVAL_S)
        return await upsert(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(PostgresStore, "upsert_worker", slow_upsert)
    model = a_model()
    async with open_scheduler(settings, nc):
        await workers("w-a", model)
        await workers("w-b", model)
        seen_before = {w.worker_id: w.last_seen for w in await db.list_workers()}
        await asyncio.sleep(4 * WORKER_TIMEOUT_S)
        rows = {w.worker_id: w for w in await db.list_workers()}
    assert {worker_id: row.status for worker_id, row in rows.items()} == {"w-a": "live", "w-b": "live"}
    assert all(rows[worker_id].last_seen > seen for worker_id, seen in seen_before.items()), "rows still written"
