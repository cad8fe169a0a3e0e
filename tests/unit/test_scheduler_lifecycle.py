"""Open, pause, resume and close as the gateway asks them, and workers coming and going, against the in-memory
store with a fake clock. Every placement here is made by the control loop's policy: the lifecycle only records
transitions and answers with what the decision did."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest

from services.common.errors import InvalidState, LimitExceeded, UnknownSession
from services.common.messages import (
    ClaimSession,
    GatewayLease,
    OpenSession,
    Placement,
    RecordPrompt,
    Reply,
    SessionClaim,
    UpdateSession,
    WorkerGone,
    WorkerHeartbeat,
)
from services.scheduler.lifecycle import NoCapacity, SessionLifecycle
from services.scheduler.store.memory import MemoryStore
from services.scheduler.store.protocol import SessionExists
from tests.scheduler_fakes import T0, Clock, Decider, make_decider

TIMEOUT_S = 3.0


@dataclass
class Scheduler:
    """One scheduler process: its decider (loop and liveness) running, and the lifecycle in front of it."""

    decider: Decider
    sessions: SessionLifecycle

    async def beat(self, beat: WorkerHeartbeat) -> None:
        await self.decider.beat(beat)

    async def lose_silent_workers(self) -> list[str]:
        """A liveness sweep, then the decision the runner triggers on a loss."""
        lost = await self.decider.liveness.sweep()
        await self.decider.loop.step("worker_lost")
        return lost


StartScheduler = Callable[..., contextlib.AbstractAsyncContextManager[Scheduler]]


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def start(store: MemoryStore, clock: Clock) -> AsyncIterator[StartScheduler]:
    @contextlib.asynccontextmanager
    async def running(wall: Callable[[], datetime] = lambda: T0) -> AsyncIterator[Scheduler]:
        decider = make_decider(store, clock, worker_timeout_s=TIMEOUT_S, offload_after_s=60.0,
                               scale_in_hold_s=1e6, wall_clock=wall)
        await decider.liveness.start()
        task = asyncio.create_task(decider.loop.run())
        try:
            yield Scheduler(decider, SessionLifecycle(store, decider.loop, wall_clock=wall))
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    yield running


@pytest.fixture
async def scheduler(start: StartScheduler) -> AsyncIterator[Scheduler]:
    async with start() as running:
        yield running


def beat(worker_id: str, *, capacity: int = 4, sessions: dict[str, int] | None = None, draining: bool = False,
         model: str = "tiny") -> WorkerHeartbeat:
    return WorkerHeartbeat(worker_id=worker_id, kind="cpu", model=model, capacity=capacity, sessions=sessions or {},
                           recent_batches=((1, 40.0),), started_at_s=1.7e9, draining=draining)


def open_request(session_id: str, *, owner: str = "alice", model: str = "tiny") -> OpenSession:
    return OpenSession(session_id=session_id, owner=owner, prompt="a red fox", seed=1, model=model)


async def test_open_places_by_the_policy_best_fit_with_epoch_one(scheduler: Scheduler, store: MemoryStore) -> None:
    await scheduler.beat(beat("w1"))
    await scheduler.beat(beat("w2"))
    first = await scheduler.sessions.open(open_request("s1"))
    second = await scheduler.sessions.open(open_request("s2"))
    assert first.epoch == second.epoch == 1 and first.worker_id == second.worker_id  # fills one worker first
    assert first.reason.startswith("new; ")
    row = await store.get_session("s1")
    assert row is not None and (row.status, row.worker_id, row.epoch, row.owner) == ("active", first.worker_id, 1,
                                                                                      "alice")
    assert row.created_at == T0
    assert scheduler.decider.io.placements == []  # the open's reply carries it


async def test_concurrent_opens_share_decisions_and_each_gets_its_own_placement(scheduler: Scheduler) -> None:
    await scheduler.beat(beat("w1", capacity=4))
    await scheduler.beat(beat("w2", capacity=4))
    placed = await asyncio.gather(*(scheduler.sessions.open(open_request(f"s{i}")) for i in range(8)))
    assert sorted(p.session_id for p in placed) == [f"s{i}" for i in range(8)]
    assert all(p.epoch == 1 for p in placed)
    per_worker = {w: sum(p.worker_id == w for p in placed) for w in ("w1", "w2")}
    assert per_worker == {"w1": 4, "w2": 4}
    assert len(scheduler.decider.loop.decide_ms) < 8  # coalesced: fewer decisions than requests


async def test_open_without_a_worker_of_the_model_is_refused_as_unavailable_and_leaves_no_row(
    scheduler: Scheduler, store: MemoryStore
) -> None:
    await scheduler.beat(beat("w1", model="wan-1.3b"))
    with pytest.raises(NoCapacity, match="no live worker serves model 'tiny'") as refused:
        await scheduler.sessions.open(open_request("s1"))
    assert refused.value.code == "unavailable"
    assert await store.get_session("s1") is None
    await scheduler.beat(beat("w2"))
    assert (await scheduler.sessions.open(open_request("s1"))).worker_id == "w2"  # the same id may open again


async def test_open_refuses_when_every_worker_is_full(scheduler: Scheduler) -> None:
    await scheduler.beat(beat("w1", capacity=1))
    await scheduler.sessions.open(open_request("s1"))
    with pytest.raises(NoCapacity, match="full or draining"):
        await scheduler.sessions.open(open_request("s2"))


async def test_a_retried_open_gets_the_same_placement_and_another_owner_is_refused(scheduler: Scheduler) -> None:
    await scheduler.beat(beat("w1"))
    first = await scheduler.sessions.open(open_request("s1"))
    again = await scheduler.sessions.open(open_request("s1"))
    assert (again.worker_id, again.epoch) == (first.worker_id, first.epoch)
    with pytest.raises(SessionExists):
        await scheduler.sessions.open(open_request("s1", owner="mallory"))


async def test_pause_and_resume_keep_the_placement_and_the_epoch(scheduler: Scheduler, store: MemoryStore) -> None:
    await scheduler.beat(beat("w1"))
    await scheduler.beat(beat("w2"))
    opened = await scheduler.sessions.open(open_request("s1"))
    paused = await scheduler.sessions.update(UpdateSession("s1", "idle", next_seq=6))
    assert isinstance(paused, Placement) and (paused.worker_id, paused.epoch) == (opened.worker_id, 1)
    row = await store.get_session("s1")
    assert row is not None and (row.status, row.next_seq) == ("idle", 6)
    resumed = await scheduler.sessions.update(UpdateSession("s1", "active", next_seq=6))
    assert isinstance(resumed, Placement) and (resumed.worker_id, resumed.epoch) == (opened.worker_id, 1)


async def test_resume_after_the_worker_went_moves_the_session_with_a_bumped_epoch(
    scheduler: Scheduler, store: MemoryStore
) -> None:
    await scheduler.beat(beat("w1"))
    await scheduler.sessions.open(open_request("s1"))
    await scheduler.sessions.update(UpdateSession("s1", "idle", next_seq=3))
    await scheduler.beat(beat("w2"))
    assert await scheduler.decider.liveness.worker_gone(WorkerGone("w1"))
    await scheduler.decider.loop.step("worker_gone")
    assert scheduler.decider.io.placements == []  # an idle session is only unplaced, and placed again on resume
    row = await store.get_session("s1")
    assert row is not None and (row.status, row.worker_id, row.epoch) == ("idle", None, 1)
    resumed = await scheduler.sessions.update(UpdateSession("s1", "active", next_seq=3))
    assert isinstance(resumed, Placement) and (resumed.worker_id, resumed.epoch) == ("w2", 2)


async def test_a_resume_with_no_room_anywhere_is_refused_and_the_session_stays_idle(
    scheduler: Scheduler, store: MemoryStore
) -> None:
    await scheduler.beat(beat("w1", capacity=1))
    await scheduler.sessions.open(open_request("s1"))
    await scheduler.sessions.update(UpdateSession("s1", "idle", next_seq=3))
    assert await scheduler.decider.liveness.worker_gone(WorkerGone("w1"))
    with pytest.raises(NoCapacity, match="no live worker serves model 'tiny'"):
        await scheduler.sessions.update(UpdateSession("s1", "active", next_seq=3))
    row = await store.get_session("s1")
    assert row is not None and (row.status, row.worker_id) == ("idle", None)


async def test_close_clears_the_placement_and_a_closed_session_cannot_resume(
    scheduler: Scheduler, store: MemoryStore
) -> None:
    await scheduler.beat(beat("w1"))
    await scheduler.sessions.open(open_request("s1"))
    assert await scheduler.sessions.update(UpdateSession("s1", "closed", next_seq=9)) == Reply(ok=True)
    row = await store.get_session("s1")
    assert row is not None and (row.status, row.worker_id) == ("closed", None)
    again = await scheduler.sessions.update(UpdateSession("s1", "closed", next_seq=9))
    assert again == Reply(ok=True, detail="already closed")
    with pytest.raises(InvalidState):
        await scheduler.sessions.update(UpdateSession("s1", "active", next_seq=9))
    with pytest.raises(UnknownSession):
        await scheduler.sessions.update(UpdateSession("nope", "idle", next_seq=0))


async def test_a_silent_worker_is_lost_after_the_timeout_and_its_active_sessions_move(
    scheduler: Scheduler, store: MemoryStore, clock: Clock
) -> None:
    await scheduler.beat(beat("w1"))
    await scheduler.sessions.open(open_request("active"))
    await scheduler.sessions.open(open_request("idle"))
    await scheduler.sessions.update(UpdateSession("idle", "idle", next_seq=2))
    await scheduler.beat(beat("w2"))
    clock.now_s += TIMEOUT_S
    await scheduler.beat(beat("w2"))
    assert await scheduler.lose_silent_workers() == []  # exactly at the timeout: not yet
    clock.now_s += 0.1
    assert await scheduler.lose_silent_workers() == ["w1"]
    assert scheduler.decider.io.placements == [Placement("active", "w2", 2, "worker w1 lost")]
    idle = await store.get_session("idle")
    assert idle is not None and (idle.status, idle.worker_id, idle.epoch) == ("idle", None, 1)
    assert {w.worker_id: w.status for w in await store.list_workers()} == {"w1": "lost", "w2": "live"}
    await scheduler.lose_silent_workers()
    assert len(scheduler.decider.io.placements) == 1


async def test_an_active_session_without_room_waits_unplaced_and_is_placed_when_a_worker_joins(
    scheduler: Scheduler, store: MemoryStore, clock: Clock
) -> None:
    await scheduler.beat(beat("w1"))
    await scheduler.sessions.open(open_request("s1"))
    clock.now_s += TIMEOUT_S + 1
    assert await scheduler.lose_silent_workers() == ["w1"]
    row = await store.get_session("s1")
    assert row is not None and (row.status, row.worker_id) == ("active", None)
    await scheduler.beat(beat("w3"))
    await scheduler.decider.loop.step("worker_joined")
    assert scheduler.decider.io.placements == [Placement("s1", "w3", 2, "it waited for capacity")]


async def test_heartbeats_record_chunk_counts_and_latency_samples(scheduler: Scheduler, store: MemoryStore) -> None:
    await scheduler.beat(beat("w1"))
    await scheduler.sessions.open(open_request("s1"))
    await scheduler.beat(beat("w1", sessions={"s1": 7}))
    row = await store.get_session("s1")
    assert row is not None and row.chunks_produced == 7
    (worker,) = await store.list_workers()
    assert worker.latency_samples == ((1, 40.0), (1, 40.0))
    assert worker.started_at == datetime.fromtimestamp(1.7e9, T0.tzinfo)


async def test_a_draining_worker_keeps_its_sessions_but_takes_no_new_ones(scheduler: Scheduler) -> None:
    await scheduler.beat(beat("w1"))
    await scheduler.sessions.open(open_request("s1"))
    await scheduler.beat(beat("w1", draining=True))
    await scheduler.sessions.update(UpdateSession("s1", "idle", next_seq=1))
    resumed = await scheduler.sessions.update(UpdateSession("s1", "active", next_seq=1))
    assert isinstance(resumed, Placement) and (resumed.worker_id, resumed.epoch) == ("w1", 1)
    with pytest.raises(NoCapacity):
        await scheduler.sessions.open(open_request("s2"))


async def test_a_restarted_scheduler_loses_workers_silent_since_long_before_and_places_nothing_on_them(
    start: StartScheduler, store: MemoryStore
) -> None:
    async with start() as before:
        await before.beat(beat("ghost"))  # a worker of an earlier run that never said goodbye
    much_later = T0 + timedelta(minutes=35)
    async with start(wall=lambda: much_later) as after:
        assert [(w.worker_id, w.status) for w in await store.list_workers()] == [("ghost", "lost")]
        with pytest.raises(NoCapacity):
            await after.sessions.open(open_request("s1"))


async def test_a_restarted_scheduler_places_new_sessions_only_on_workers_it_has_heard_from(
    start: StartScheduler,
) -> None:
    async with start() as before:
        await before.beat(beat("w1"))
    async with start() as after:
        with pytest.raises(NoCapacity):  # recorded live, within the grace, but maybe not subscribed yet
            await after.sessions.open(open_request("s1"))
        await after.beat(beat("w1"))
        placed = await after.sessions.open(open_request("s1"))
        assert (placed.worker_id, placed.epoch) == ("w1", 1)


async def test_a_restarted_scheduler_gives_recorded_workers_a_full_timeout_before_losing_them(
    start: StartScheduler, store: MemoryStore, clock: Clock
) -> None:
    async with start() as before:
        await before.beat(beat("w1"))
        await before.sessions.open(open_request("s1"))
    clock.now_s += 100.0  # the scheduler was down for a long time
    async with start() as after:
        assert await after.lose_silent_workers() == []
        row = await store.get_session("s1")
        assert row is not None and row.worker_id == "w1"  # kept on its worker through the grace
        clock.now_s += TIMEOUT_S + 0.1
        assert await after.lose_silent_workers() == ["w1"]
        assert after.decider.io.placements == []  # nowhere to move s1: it waits unplaced
        assert [w.status for w in await store.list_workers()] == ["lost"]


async def test_a_close_is_logged_with_the_reason_the_gateway_gave(
    scheduler: Scheduler, caplog: pytest.LogCaptureFixture,
) -> None:
    await scheduler.beat(beat("w1"))
    await scheduler.sessions.open(open_request("s1"))
    await scheduler.sessions.open(open_request("s2"))
    with caplog.at_level(logging.INFO):
        await scheduler.sessions.update(UpdateSession("s1", "closed", next_seq=4, reason="the 60 s linger ran out"))
        await scheduler.sessions.update(UpdateSession("s2", "closed", next_seq=4))
    closes = [r.getMessage() for r in caplog.records if "decision=close" in r.getMessage()]
    assert "reason='the 60 s linger ran out'" in closes[0] and "reason='closed by its client'" in closes[1]


class Wall:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


async def test_a_session_whose_gateway_died_is_closed_after_lease_and_linger_and_its_worker_told(
    start: StartScheduler, store: MemoryStore
) -> None:
    wall = Wall()
    async with start(wall=wall) as scheduler:
        await scheduler.beat(beat("w1"))
        kept = OpenSession("kept", "alice", "a red fox", 1, "tiny", gateway_id="g1", lease_s=6.0)
        dead = OpenSession("dead", "alice", "a red fox", 1, "tiny", gateway_id="g2", lease_s=6.0)
        await scheduler.sessions.open(kept)
        placed = await scheduler.sessions.open(dead)
        wall.now += timedelta(seconds=50)
        await scheduler.sessions.renew_leases(GatewayLease("g1", 6.0, {"kept": 12}))
        wall.now += timedelta(seconds=20)  # g2's lease ran out 64 s ago; the linger is 60 s
        await scheduler.decider.loop.step("period")
        gone = await store.get_session("dead")
        assert gone is not None and (gone.status, gone.worker_id) == ("closed", None)
        assert ("release", "w1", "dead") in scheduler.decider.journal.entries
        alive = await store.get_session("kept")
        assert alive is not None and (alive.status, alive.next_seq) == ("active", 12)
        assert placed.worker_id == "w1"


async def test_another_gateway_takes_a_session_over_with_its_prompt_history_and_the_first_one_is_refused(
    scheduler: Scheduler,
) -> None:
    await scheduler.beat(beat("w1"))
    opened = await scheduler.sessions.open(
        OpenSession("s1", "alice", "a red fox", 5, "tiny", gateway_id="g1", lease_s=6.0)
    )
    await scheduler.sessions.record_prompt(RecordPrompt("s1", 9, "a fox in the snow"))
    with pytest.raises(UnknownSession):
        await scheduler.sessions.claim(ClaimSession("s1", "mallory", "g2", 6.0))
    claim = await scheduler.sessions.claim(ClaimSession("s1", "alice", "g2", 6.0))
    assert claim == SessionClaim("s1", 5, "tiny", "active", ((0, "a red fox"), (9, "a fox in the snow")), 0,
                                 opened.worker_id, opened.epoch + 1)
    with pytest.raises(InvalidState, match="taken over by gateway g2"):
        await scheduler.sessions.update(UpdateSession("s1", "closed", 4, "linger ran out", gateway_id="g1"))
    assert await scheduler.sessions.update(UpdateSession("s1", "closed", 4, gateway_id="g2")) == Reply(ok=True)


async def test_opens_past_the_per_token_limit_are_refused_whichever_gateway_asks(scheduler: Scheduler) -> None:
    await scheduler.beat(beat("w1"))
    for index, gateway in enumerate(("g1", "g2")):
        await scheduler.sessions.open(OpenSession(f"s{index}", "alice", "a fox", 1, "tiny", gateway_id=gateway,
                                                  max_open_per_owner=2))
    with pytest.raises(LimitExceeded, match="limit 2"):
        await scheduler.sessions.open(OpenSession("s2", "alice", "a fox", 1, "tiny", gateway_id="g3",
                                                  max_open_per_owner=2))
