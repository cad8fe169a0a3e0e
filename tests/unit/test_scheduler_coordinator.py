"""The scheduler's decisions, on the in-memory store with a fake clock: no NATS, no sleeps."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest

from services.common.errors import InvalidState, UnknownSession
from services.common.messages import OpenSession, Placement, Reply, UpdateSession, WorkerGone, WorkerHeartbeat
from services.scheduler.coordinator import Coordinator, NoCapacity
from services.scheduler.store.memory import MemoryStore
from services.scheduler.store.protocol import SessionExists

TIMEOUT_S = 3.0


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def wall() -> datetime:
    return datetime(2026, 11, 22, 3, 0, tzinfo=UTC)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
async def coordinator(store: MemoryStore, clock: FakeClock) -> Coordinator:
    coordinator = Coordinator(store, worker_timeout_s=TIMEOUT_S, clock=clock, wall_clock=wall)
    await coordinator.start()
    return coordinator


def beat(worker_id: str, *, capacity: int = 4, sessions: dict[str, int] | None = None, draining: bool = False,
         model: str = "tiny") -> WorkerHeartbeat:
    return WorkerHeartbeat(worker_id=worker_id, kind="cpu", model=model, capacity=capacity, sessions=sessions or {},
                           recent_batches=((1, 40.0),), started_at_s=1.7e9, draining=draining)


def open_request(session_id: str, *, owner: str = "alice", model: str = "tiny") -> OpenSession:
    return OpenSession(session_id=session_id, owner=owner, prompt="a red fox", seed=1, model=model)


async def test_open_places_on_the_least_loaded_worker_with_epoch_one(
    coordinator: Coordinator, store: MemoryStore
) -> None:
    await coordinator.observe_heartbeat(beat("w1"))
    await coordinator.observe_heartbeat(beat("w2"))
    first = await coordinator.open_session(open_request("s1"))
    second = await coordinator.open_session(open_request("s2"))
    assert {(first.worker_id, first.epoch), (second.worker_id, second.epoch)} == {("w1", 1), ("w2", 1)}
    row = await store.get_session("s1")
    assert row is not None and (row.status, row.worker_id, row.epoch, row.owner) == ("active", "w1", 1, "alice")
    assert row.created_at == wall()


async def test_open_without_a_worker_of_the_model_is_refused_as_unavailable(coordinator: Coordinator) -> None:
    await coordinator.observe_heartbeat(beat("w1", model="wan-1.3b"))
    with pytest.raises(NoCapacity, match="no live worker serves model 'tiny'") as refused:
        await coordinator.open_session(open_request("s1"))
    assert refused.value.code == "unavailable"


async def test_open_refuses_when_every_worker_is_full(coordinator: Coordinator) -> None:
    await coordinator.observe_heartbeat(beat("w1", capacity=1))
    await coordinator.open_session(open_request("s1"))
    with pytest.raises(NoCapacity, match="full or draining"):
        await coordinator.open_session(open_request("s2"))


async def test_a_retried_open_gets_the_same_placement_and_another_owner_is_refused(coordinator: Coordinator) -> None:
    await coordinator.observe_heartbeat(beat("w1"))
    first = await coordinator.open_session(open_request("s1"))
    again = await coordinator.open_session(open_request("s1"))
    assert (again.worker_id, again.epoch) == (first.worker_id, first.epoch)
    with pytest.raises(SessionExists):
        await coordinator.open_session(open_request("s1", owner="mallory"))


async def test_pause_and_resume_keep_the_placement_and_the_epoch(coordinator: Coordinator, store: MemoryStore) -> None:
    await coordinator.observe_heartbeat(beat("w1"))
    await coordinator.observe_heartbeat(beat("w2"))
    opened = await coordinator.open_session(open_request("s1"))
    paused = await coordinator.update_session(UpdateSession("s1", "idle", next_seq=6))
    assert isinstance(paused, Placement) and (paused.worker_id, paused.epoch) == (opened.worker_id, 1)
    row = await store.get_session("s1")
    assert row is not None and (row.status, row.next_seq) == ("idle", 6)
    resumed = await coordinator.update_session(UpdateSession("s1", "active", next_seq=6))
    assert isinstance(resumed, Placement) and (resumed.worker_id, resumed.epoch) == (opened.worker_id, 1)


async def test_resume_after_the_worker_went_moves_the_session_with_a_bumped_epoch(coordinator: Coordinator) -> None:
    await coordinator.observe_heartbeat(beat("w1"))
    await coordinator.open_session(open_request("s1"))
    await coordinator.update_session(UpdateSession("s1", "idle", next_seq=3))
    await coordinator.observe_heartbeat(beat("w2"))
    moved = await coordinator.worker_gone(WorkerGone("w1"))
    assert moved == []  # an idle session is only unplaced, and placed again on resume
    resumed = await coordinator.update_session(UpdateSession("s1", "active", next_seq=3))
    assert isinstance(resumed, Placement) and (resumed.worker_id, resumed.epoch) == ("w2", 2)


async def test_close_clears_the_placement_and_a_closed_session_cannot_resume(
    coordinator: Coordinator, store: MemoryStore
) -> None:
    await coordinator.observe_heartbeat(beat("w1"))
    await coordinator.open_session(open_request("s1"))
    assert await coordinator.update_session(UpdateSession("s1", "closed", next_seq=9)) == Reply(ok=True)
    row = await store.get_session("s1")
    assert row is not None and (row.status, row.worker_id) == ("closed", None)
    again = await coordinator.update_session(UpdateSession("s1", "closed", next_seq=9))
    assert again == Reply(ok=True, detail="already closed")
    with pytest.raises(InvalidState):
        await coordinator.update_session(UpdateSession("s1", "active", next_seq=9))
    with pytest.raises(UnknownSession):
        await coordinator.update_session(UpdateSession("nope", "idle", next_seq=0))


async def test_a_silent_worker_is_lost_after_the_timeout_and_its_active_sessions_move(
    coordinator: Coordinator, store: MemoryStore, clock: FakeClock
) -> None:
    await coordinator.observe_heartbeat(beat("w1"))
    await coordinator.open_session(open_request("active"))
    await coordinator.open_session(open_request("idle"))
    await coordinator.update_session(UpdateSession("idle", "idle", next_seq=2))
    await coordinator.observe_heartbeat(beat("w2"))
    clock.now_s += TIMEOUT_S
    await coordinator.observe_heartbeat(beat("w2"))
    assert await coordinator.sweep() == []  # exactly at the timeout: not yet
    clock.now_s += 0.1
    placements = await coordinator.sweep()
    assert placements == [Placement("active", "w2", 2, "worker w1 lost")]
    idle = await store.get_session("idle")
    assert idle is not None and (idle.status, idle.worker_id, idle.epoch) == ("idle", None, 1)
    assert {w.worker_id: w.status for w in await store.list_workers()} == {"w1": "lost", "w2": "live"}
    assert await coordinator.sweep() == []


async def test_an_active_session_without_room_waits_unplaced_and_is_placed_when_a_worker_joins(
    coordinator: Coordinator, store: MemoryStore, clock: FakeClock
) -> None:
    await coordinator.observe_heartbeat(beat("w1"))
    await coordinator.open_session(open_request("s1"))
    clock.now_s += TIMEOUT_S + 1
    assert await coordinator.sweep() == []
    row = await store.get_session("s1")
    assert row is not None and (row.status, row.worker_id) == ("active", None)
    await coordinator.observe_heartbeat(beat("w3"))
    assert await coordinator.sweep() == [Placement("s1", "w3", 2, "it waited for capacity")]


async def test_heartbeats_record_chunk_counts_and_latency_samples(coordinator: Coordinator, store: MemoryStore) -> None:
    await coordinator.observe_heartbeat(beat("w1"))
    await coordinator.open_session(open_request("s1"))
    await coordinator.observe_heartbeat(beat("w1", sessions={"s1": 7}))
    row = await store.get_session("s1")
    assert row is not None and row.chunks_produced == 7
    (worker,) = await store.list_workers()
    assert worker.latency_samples == ((1, 40.0), (1, 40.0))
    assert worker.started_at == datetime.fromtimestamp(1.7e9, UTC)


async def test_a_draining_worker_keeps_its_sessions_but_takes_no_new_ones(coordinator: Coordinator) -> None:
    await coordinator.observe_heartbeat(beat("w1"))
    await coordinator.open_session(open_request("s1"))
    await coordinator.observe_heartbeat(beat("w1", draining=True))
    await coordinator.update_session(UpdateSession("s1", "idle", next_seq=1))
    resumed = await coordinator.update_session(UpdateSession("s1", "active", next_seq=1))
    assert isinstance(resumed, Placement) and (resumed.worker_id, resumed.epoch) == ("w1", 1)
    with pytest.raises(NoCapacity):
        await coordinator.open_session(open_request("s2"))


async def test_a_restarted_coordinator_loses_workers_silent_since_long_before_and_places_nothing_on_them(
    store: MemoryStore, clock: FakeClock
) -> None:
    before = Coordinator(store, worker_timeout_s=TIMEOUT_S, clock=clock, wall_clock=wall)
    await before.start()
    await before.observe_heartbeat(beat("ghost"))  # a worker of an earlier run that never said goodbye
    much_later = wall() + timedelta(minutes=35)
    after = Coordinator(store, worker_timeout_s=TIMEOUT_S, clock=clock, wall_clock=lambda: much_later)
    await after.start()
    assert [(w.worker_id, w.status) for w in await store.list_workers()] == [("ghost", "lost")]
    with pytest.raises(NoCapacity):
        await after.open_session(open_request("s1"))


async def test_a_restarted_coordinator_places_new_sessions_only_on_workers_it_has_heard_from(
    store: MemoryStore, clock: FakeClock
) -> None:
    before = Coordinator(store, worker_timeout_s=TIMEOUT_S, clock=clock, wall_clock=wall)
    await before.start()
    await before.observe_heartbeat(beat("w1"))
    after = Coordinator(store, worker_timeout_s=TIMEOUT_S, clock=clock, wall_clock=wall)
    await after.start()
    with pytest.raises(NoCapacity):  # recorded live, within the grace, but maybe not subscribed yet
        await after.open_session(open_request("s1"))
    await after.observe_heartbeat(beat("w1"))
    placed = await after.open_session(open_request("s1"))
    assert (placed.worker_id, placed.epoch) == ("w1", 1)


async def test_a_restarted_coordinator_gives_recorded_workers_a_full_timeout_before_losing_them(
    store: MemoryStore, clock: FakeClock
) -> None:
    before = Coordinator(store, worker_timeout_s=TIMEOUT_S, clock=clock, wall_clock=wall)
    await before.start()
    await before.observe_heartbeat(beat("w1"))
    await before.open_session(open_request("s1"))
    clock.now_s += 100.0  # the scheduler was down for a long time
    after = Coordinator(store, worker_timeout_s=TIMEOUT_S, clock=clock, wall_clock=wall)
    await after.start()
    assert await after.sweep() == []
    clock.now_s += TIMEOUT_S + 0.1
    assert await after.sweep() == []  # lost, but there is nowhere to move s1: it waits unplaced
    assert [w.status for w in await store.list_workers()] == ["lost"]


async def test_a_close_is_logged_with_the_reason_the_gateway_gave(
    coordinator: Coordinator, caplog: pytest.LogCaptureFixture,
) -> None:
    await coordinator.observe_heartbeat(beat("w1"))
    await coordinator.open_session(open_request("s1"))
    await coordinator.open_session(open_request("s2"))
    with caplog.at_level(logging.INFO):
        await coordinator.update_session(UpdateSession("s1", "closed", next_seq=4, reason="the 60 s linger ran out"))
        await coordinator.update_session(UpdateSession("s2", "closed", next_seq=4))
    closes = [r.getMessage() for r in caplog.records if "decision=close" in r.getMessage()]
    assert "reason='the 60 s linger ran out'" in closes[0] and "reason='closed by its client'" in closes[1]
