"""The live control loop against the in-memory store and fakes of the StateMover, the Provisioner and NATS:
snapshot in, plan executed in order, every action with its reason, bounds kept, nothing dropped by a scale-in."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from datetime import datetime, timedelta

import pytest

from services.common.control import MigrationReport
from services.common.errors import InvalidField
from services.common.messages import WorkerHeartbeat
from services.common.wire import decode, encode
from services.scheduler.cluster_view import ClusterView, sync
from services.scheduler.control_loop import ControlLoop
from services.scheduler.control_settings import ControlSettings, build_live_controller
from services.scheduler.leadership import LeadershipLost
from services.scheduler.policy import (
    Action,
    AddGpus,
    ClusterSnapshot,
    DrainGpu,
    GpuView,
    Migrate,
    Offload,
    Place,
    Plan,
    RemoveGpu,
    Restore,
    SessionView,
)
from services.scheduler.policy.autoscale import AnticipatoryHeadroom
from services.scheduler.policy.detector import DEFAULT_LEVELS, WorkloadReading
from services.scheduler.provisioners.kubernetes import KubernetesProvisioner
from services.scheduler.store.memory import MemoryStore
from services.scheduler.store.protocol import SessionRecord, WorkerRecord, WorkerReport
from tests.scheduler_fakes import (
    T0,
    Clock,
    Decider,
    FakeIO,
    FakeMover,
    FakeProvisioner,
    FakeStatefulSetApi,
    Journal,
    make_decider,
)


def session(session_id: str, worker_id: str | None, status: str = "active") -> SessionRecord:
    return SessionRecord(session_id, "owner", "a fox", 1, "tiny", status, worker_id, 1, 3, 3, T0, T0)  # type: ignore[arg-type]


async def add_worker(store: MemoryStore, loop: ControlLoop, worker_id: str, offloaded: tuple[str, ...] = (),
                     model: str = "tiny") -> None:
    beat = WorkerHeartbeat(worker_id, "cpu", model, 4, offloaded=offloaded)
    await loop.liveness.observe_heartbeat(beat)
    loop.observe_heartbeat(beat)


def make_loop(store: MemoryStore, journal: Journal, clock: Clock, *, fail_moves: bool = False,
              max_gpus: int = 3, offload_after_s: float = 0.0) -> tuple[ControlLoop, FakeProvisioner, FakeIO]:
    decider = make_decider(store, clock, journal=journal, fail_moves=fail_moves, max_gpus=max_gpus,
                           offload_after_s=offload_after_s)
    return decider.loop, decider.provisioner, decider.io


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


async def test_a_new_session_is_placed_by_the_policy_never_on_a_draining_full_unheard_or_other_model_worker(
    store: MemoryStore,
) -> None:
    loop, _, io = make_loop(store, Journal(), Clock())
    for worker in ("w1", "w2", "w3"):
        await add_worker(store, loop, worker)
    await add_worker(store, loop, "other", model="wan-1.3b")
    await store.upsert_worker(WorkerReport("unheard", "cpu", "tiny", 4, 0, False, T0, ()), T0)  # row only
    loop.view.draining.add("w2")
    for index in range(4):
        await store.insert_session(session(f"full-{index}", "w1"))
    await store.insert_session(session("one", "w3"))
    await store.insert_session(dataclasses.replace(session("new", None), epoch=0, chunks_produced=0))
    plan = await loop.step("open")
    (place,) = [a for a in plan.actions if isinstance(a, Place)]
    assert (place.session_id, place.gpu_id) == ("new", "w3") and place.reason.startswith("new; ")
    row = await store.get_session("new")
    assert row is not None and (row.worker_id, row.epoch) == ("w3", 1)
    assert io.placements == []  # a new session's placement is the open's reply, not a broadcast
    assert loop.unplaced_reason("tiny") == "all 3 live workers of model 'tiny' are full or draining"
    assert loop.unplaced_reason("ltx") == "no live worker serves model 'ltx'"


def test_measured_batch_latencies_from_heartbeats_refit_the_latency_model(store: MemoryStore) -> None:
    loop, _, _ = make_loop(store, Journal(), Clock())
    before = loop.controller.models.latency.curve("cpu").chunk_latency_ms(2)
    for _ in range(50):
        loop.observe_heartbeat(WorkerHeartbeat("w1", "cpu", "tiny", 4, recent_batches=((2, 900.0), (1, 700.0))))
    assert loop.controller.models.latency.curve("cpu").chunk_latency_ms(2) > before + 300


def test_a_migration_report_refits_the_link_its_two_workers_share(store: MemoryStore) -> None:
    loop, _, _ = make_loop(store, Journal(), Clock())
    for worker, node in (("a1", "rack-a"), ("a2", "rack-a"), ("b1", "rack-b")):
        loop.observe_heartbeat(WorkerHeartbeat(worker, "cpu", "tiny", 4, node=node))
    migration = loop.controller.models.migration
    same, cross = migration.cost_ms(4 * 10**9, same_node=True), migration.cost_ms(4 * 10**9)
    for _ in range(100):
        loop.observe_migration(MigrationReport("s", 1, "a1", "a2", "copied", state_bytes=4 * 10**9, transfer_ms=400.0))
    assert migration.cost_ms(4 * 10**9, same_node=True) > same + 300  # within rack-a: the slow sample was NVLink's
    assert migration.cost_ms(4 * 10**9) == cross
    loop.observe_migration(MigrationReport("s", 1, "a1", "b1", "copied", state_bytes=4 * 10**9, transfer_ms=400.0))
    assert migration.cost_ms(4 * 10**9) > cross  # across nodes: the network's fit


def test_measured_restores_from_heartbeats_refit_the_resume_penalty_and_a_bad_sample_is_dropped(
    store: MemoryStore,
) -> None:
    loop, _, _ = make_loop(store, Journal(), Clock())
    restore = loop.controller.models.restore
    before = restore.cost_ms(100_000_000)
    for _ in range(50):
        loop.observe_heartbeat(WorkerHeartbeat("w1", "cpu", "tiny", 4, recent_restores=((100_000_000, 2_000.0),)))
    loop.observe_heartbeat(WorkerHeartbeat("w1", "cpu", "tiny", 4, recent_restores=((-1, 5.0),)))
    assert restore.cost_ms(100_000_000) > before + 1_000
    mistyped = encode(WorkerHeartbeat("w1", "cpu", "tiny", 4, recent_restores=(("many", 5.0),)))  # type: ignore[arg-type]
    with pytest.raises(InvalidField, match="recent_restores"):
        decode(mistyped, expect=WorkerHeartbeat)


async def test_an_idle_session_in_a_slot_is_offloaded_and_the_plan_and_its_timing_are_logged(
    store: MemoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    journal = Journal()
    loop, _, _ = make_loop(store, journal, Clock())
    await add_worker(store, loop, "w1")
    await store.insert_session(session("s1", "w1", "idle"))
    with caplog.at_level(logging.INFO, logger="turboserve.scheduler.control"):
        plan = await loop.step("idle")
    assert [a for a in plan.actions if isinstance(a, Offload)] == [Offload("s1", "w1", plan.actions[0].reason)]
    assert journal.entries[0][:3] == ("offload", "s1", "w1") and "idle" in journal.entries[0][3]
    assert "event=plan trigger=idle decide_ms=" in caplog.text and len(loop.decide_ms) == 1
    assert "s1" in loop.view.offloaded["w1"]


async def test_a_session_paused_only_a_moment_ago_keeps_its_slot_so_a_quick_resume_cannot_race_an_offload(
    store: MemoryStore,
) -> None:
    journal = Journal()
    loop, _, _ = make_loop(store, journal, Clock(), offload_after_s=10.0)
    await add_worker(store, loop, "w1")
    await store.insert_session(session("s1", "w1", "idle"))
    plan = await loop.step("idle")
    assert any(isinstance(a, Offload) for a in plan.actions) and journal.entries == []


async def test_an_active_session_without_a_worker_gets_a_fenced_placement_the_gateway_hears_of(
    store: MemoryStore,
) -> None:
    loop, _, io = make_loop(store, Journal(), Clock())
    await add_worker(store, loop, "w1")
    await store.insert_session(session("s1", None))
    plan = await loop.step("re_placed")
    assert any(isinstance(a, (Place, Restore)) and a.session_id == "s1" for a in plan.actions)
    row = await store.get_session("s1")
    assert row is not None and (row.worker_id, row.epoch) == ("w1", 2)
    assert [(p.session_id, p.worker_id, p.epoch) for p in io.placements] == [("s1", "w1", 2)]


async def test_load_above_the_pool_asks_for_workers_once_and_never_past_max_gpus(store: MemoryStore) -> None:
    journal = Journal()
    clock = Clock()
    loop, provisioner, _ = make_loop(store, journal, clock, max_gpus=3)
    await add_worker(store, loop, "w1")
    for index in range(6):
        await store.insert_session(session(f"s{index}", "w1" if index < 4 else None))
    plan = await loop.step("open_session")
    assert any(isinstance(a, AddGpus) for a in plan.actions)
    assert provisioner.started == 2 and set(loop.view.pending) == {"new-1", "new-2"}
    clock.now_s += 2
    again = await loop.step("period")
    assert not any(isinstance(a, AddGpus) for a in again.actions) and provisioner.started == 2
    await add_worker(store, loop, "new-1")
    assert set(loop.view.pending) == {"new-2"}


async def test_scale_in_drains_then_removes_and_every_session_survives_on_a_live_worker(store: MemoryStore) -> None:
    journal = Journal()
    clock = Clock()
    loop, provisioner, _ = make_loop(store, journal, clock)
    for worker in ("w1", "w2", "w3"):
        await store.insert_session(session(f"active-{worker}", worker))
        await store.insert_session(session(f"idle-{worker}", worker, "idle"))
        await add_worker(store, loop, worker, offloaded=(f"idle-{worker}",))
    actions = []
    for _ in range(6):
        actions.extend((await loop.step("period")).actions)
        clock.now_s += 2
    removed = [e[1] for e in journal.entries if e[0] == "remove"]
    assert len(removed) == 1
    drained = removed[0]
    kinds = [type(a) for a in actions if getattr(a, "gpu_id", getattr(a, "source_gpu_id", None)) == drained]
    assert kinds.index(DrainGpu) < kinds.index(Migrate) < kinds.index(RemoveGpu)
    order = [e[0] for e in journal.entries if drained in e]
    assert order.index("drain") < order.index("migrate") < order.index("remove")
    assert all(a.reason for a in actions)
    live = {w.worker_id for w in await store.list_workers() if w.status == "live"}
    rows = await store.list_sessions()
    assert len(rows) == 6 and all(row.worker_id in live for row in rows)
    await store.upsert_worker(WorkerReport(drained, "cpu", "tiny", 4, 0, False, T0, ()), T0)  # a late beat's row
    await loop.step("period")
    assert drained not in loop.snapshot.gpus  # a removed worker is back only if it heart-beats after its grace


async def test_idle_state_moved_off_a_removed_worker_never_goes_to_a_worker_the_same_plan_removed_before(
    store: MemoryStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    journal = Journal()
    clock = Clock()
    loop, _, _ = make_loop(store, journal, clock)
    await store.insert_session(session("paused", "w1", "idle"))
    await store.insert_session(session("streaming", "w3"))
    for worker, offloaded in (("w1", ("paused",)), ("w2", ()), ("w3", ())):
        await add_worker(store, loop, worker, offloaded=offloaded)
    plan = Plan((RemoveGpu("w2", "scale in"), RemoveGpu("w1", "scale in")), "stable", 100.0, 1)
    monkeypatch.setattr(loop.controller, "decide", lambda snapshot, now_s: plan)
    await loop.step("period")
    assert [e[0:2] for e in journal.entries if e[0] == "remove"] == [("remove", "w2"), ("remove", "w1")]
    assert [e[3] for e in journal.entries if e[0] == "migrate"] == ["w3"]  # the emptiest, once w2 is gone
    row = await store.get_session("paused")
    assert row is not None and row.worker_id == "w3"


async def test_a_worker_is_not_removed_while_an_active_session_could_not_be_moved_off_it(
    store: MemoryStore,
) -> None:
    journal = Journal()
    clock = Clock()
    loop, _, _ = make_loop(store, journal, clock, fail_moves=True)
    for worker in ("w1", "w2", "w3"):
        await store.insert_session(session(f"active-{worker}", worker))
        await add_worker(store, loop, worker)
    for _ in range(6):
        await loop.step("period")
        clock.now_s += 2
    assert any(e[0] == "drain" for e in journal.entries)
    assert not any(e[0] == "remove" for e in journal.entries)
    assert len(await store.list_sessions()) == 3


async def test_a_worker_asked_for_that_never_heart_beats_is_given_up_after_the_timeout(store: MemoryStore) -> None:
    journal = Journal()
    clock = Clock()
    loop, _, _ = make_loop(store, journal, clock)
    await add_worker(store, loop, "w1")
    loop.view.add_pending(["new-9"], 1, clock.now_s)
    clock.now_s += 61
    await loop.step("period")
    assert ("remove", "new-9") in [e[:2] for e in journal.entries] and "new-9" not in loop.view.pending


def test_a_swap_between_two_full_workers_syncs_in_place_and_keeps_the_detectors_counters(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gpus = {g: GpuView(g, "cpu", 1, 0.0) for g in ("w1", "w2")}
    before = {"a": SessionView("a", 0, True, "w1"), "b": SessionView("b", 0, True, "w2")}
    snapshot = sync(ClusterSnapshot(), before, gpus)
    after = {"a": SessionView("a", 0, True, "w2"), "b": SessionView("b", 0, False, "w1")}
    with caplog.at_level(logging.WARNING):
        synced = sync(snapshot, after, gpus)
    assert synced is snapshot and "snapshot_rebuilt" not in caplog.text
    assert (synced.residents["w1"], synced.residents["w2"]) == ({"b": None}, {"a": None})
    assert (synced.arrivals_total, synced.deactivations_total) == (2, 1)


def test_the_live_controller_takes_the_shorter_hold_and_detector_window_and_keeps_the_registry_policy() -> None:
    controller = build_live_controller(ControlSettings(scale_in_hold_s=2.0, detector_window_s=10.0, max_gpus=3))
    assert controller.name == "ours" and controller.autoscale.hold_s == 2.0
    assert (controller.detector.window_s, controller.detector.recent_s) == (10.0, 1.0)
    assert controller.autoscale.max_gpus == 3


async def test_a_session_already_offloaded_is_not_offloaded_again(store: MemoryStore) -> None:
    journal = Journal()
    loop, _, _ = make_loop(store, journal, Clock())
    await add_worker(store, loop, "w1")
    await store.insert_session(session("s1", "w1", "idle"))
    await loop.step("idle")
    assert [entry[:3] for entry in journal.entries] == [("offload", "s1", "w1")]
    plan = await loop.step("idle")
    assert not any(isinstance(a, Offload) for a in plan.actions), "its state already left the slot"
    assert [entry[:3] for entry in journal.entries] == [("offload", "s1", "w1")]


class HeldMover(FakeMover):
    """Migrations wait until released, so a test can act while the loop is in the middle of a plan."""

    def __init__(self, store: MemoryStore, journal: Journal) -> None:
        super().__init__(store, journal)
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def migrate(self, session_id: str, source: str, target: str, epoch: int, reason: str) -> MigrationReport:
        self.started.set()
        await self.release.wait()
        return await super().migrate(session_id, source, target, epoch, reason)


async def test_a_worker_killed_while_the_loop_is_mid_rebalance_has_each_orphan_placed_exactly_once(
    store: MemoryStore,
) -> None:
    clock = Clock()
    decider = make_decider(store, clock, max_gpus=3)
    loop = decider.loop
    mover = HeldMover(store, decider.journal)
    loop._mover = mover
    hot = [f"hot-{i}" for i in range(4)]
    doomed = ["doomed-0", "doomed-1"]
    for session_id in hot:
        await store.insert_session(session(session_id, "w1"))
    for session_id in doomed:
        await store.insert_session(session(session_id, "w2"))
    measured = ((4, 900.0), (2, 300.0), (1, 200.0))  # four on one worker miss the 400 ms target: rebalance
    for worker in ("w1", "w2", "w3"):
        for _ in range(50):
            await decider.beat(WorkerHeartbeat(worker, "cpu", "tiny", 4, recent_batches=measured))
    runner = asyncio.create_task(loop.run())
    try:
        loop.trigger("period")
        await asyncio.wait_for(mover.started.wait(), timeout=5)  # a rebalancing migration is in flight
        clock.now_s += 10.0  # w2 goes silent; w1 and w3 keep beating
        for worker in ("w1", "w3"):
            await decider.beat(WorkerHeartbeat(worker, "cpu", "tiny", 4))
        assert await decider.liveness.sweep() == ["w2"]
        loop.trigger("worker_lost")
        extra = asyncio.create_task(loop.step("worker_lost"))  # a second caller while the plan runs
        await asyncio.sleep(0.05)
        mover.release.set()
        await asyncio.wait_for(extra, timeout=5)
        for _ in range(3):
            await loop.step("period")
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
    moves = [entry for entry in decider.journal.entries if entry[0] == "migrate"]
    assert moves and all(entry[2] == "w1" for entry in moves), "the plan in flight was a rebalance off w1"
    placed = [p.session_id for p in decider.io.placements]
    assert sorted(placed) == doomed, f"each orphan placed exactly once, got {placed}"
    live = {w.worker_id for w in await store.list_workers() if w.status == "live"}
    rows = {row.session_id: row for row in await store.list_sessions()}
    assert all(rows[s].worker_id in live and rows[s].epoch == 2 for s in doomed)
    assert all(row.worker_id in live for row in rows.values())
    per_worker = [sum(row.worker_id == w for row in rows.values()) for w in live]
    assert max(per_worker) <= 4


async def test_the_rest_of_a_plan_skips_a_worker_lost_while_it_ran_and_the_next_decision_sees_the_loss(
    store: MemoryStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    decider = make_decider(store, clock)
    mover = HeldMover(store, decider.journal)
    decider.loop._mover = mover
    for worker in ("w1", "w2"):
        await decider.beat(WorkerHeartbeat(worker, "cpu", "tiny", 4))
    for session_id in ("a", "b"):
        await store.insert_session(session(session_id, "w1"))
    await store.insert_session(session("new", None))
    monkeypatch.setattr(decider.loop.controller, "decide", Script((
        Migrate("a", "w1", "w2", 1e6, "rebalance"), Migrate("b", "w1", "w2", 1e6, "rebalance"),
        Place("new", "w1", "new"), Place("new", "w2", "new"),
    )))
    plan = asyncio.create_task(decider.loop.step("period"))
    await asyncio.wait_for(mover.started.wait(), timeout=5)  # the first migration is in flight
    clock.now_s += 10.0  # w1 goes silent
    await decider.beat(WorkerHeartbeat("w2", "cpu", "tiny", 4))
    assert await decider.liveness.sweep() == ["w1"]
    mover.release.set()
    await asyncio.wait_for(plan, timeout=5)
    assert [entry[:4] for entry in decider.journal.entries if entry[0] == "migrate"] == [("migrate", "a", "w1", "w2")]
    rows = {row.session_id: row for row in await store.list_sessions()}
    assert rows["a"].worker_id == "w2" and rows["b"].worker_id == "w1" and rows["new"].worker_id == "w2"


async def test_a_session_left_waiting_on_full_workers_takes_an_overflow_slot_once_it_has_waited(
    store: MemoryStore,
) -> None:
    clock = Clock()
    loop, _, _ = make_loop(store, Journal(), clock, max_gpus=1)
    await add_worker(store, loop, "w1")
    for index in range(4):
        await store.insert_session(session(f"full-{index}", "w1"))
    await store.insert_session(dataclasses.replace(session("new", None), epoch=0, chunks_produced=0))
    first = await loop.step("open")
    assert not [a for a in first.actions if isinstance(a, Place)]
    clock.now_s += 1.0
    assert not [a for a in (await loop.step("tick")).actions if isinstance(a, Place)]
    clock.now_s += 2.5  # 3.5 s since the first decision saw it wait
    (place,) = [a for a in (await loop.step("tick")).actions if isinstance(a, Place)]
    assert (place.session_id, place.gpu_id) == ("new", "w1") and "overflow" in place.reason
    row = await store.get_session("new")
    assert row is not None and row.worker_id == "w1"
    await loop.step("tick")
    assert loop.snapshot.sessions["new"].gpu_id == "w1"  # the fifth keeps its overflow slot in the next snapshot


async def test_a_scheduler_that_restarts_counts_a_wait_from_the_sessions_row_and_does_not_start_it_over(
    store: MemoryStore,
) -> None:
    clock = Clock()
    waited_before_s = 1.2  # the scheduler that saw the wait begin died; its successor starts now

    def wall() -> datetime:
        return T0 + timedelta(seconds=waited_before_s + clock.now_s - 100.0)

    loop = make_decider(store, clock, max_gpus=1, wall_clock=wall).loop
    await add_worker(store, loop, "w1")
    for index in range(4):
        await store.insert_session(session(f"full-{index}", "w1"))
    await store.insert_session(dataclasses.replace(session("new", None), epoch=0, chunks_produced=0))
    ahead = dataclasses.replace(session("ahead", None), epoch=0, chunks_produced=0,  # opened later, its row
                                created_at=T0 + timedelta(seconds=1),  # written by a clock a minute ahead
                                updated_at=T0 + timedelta(seconds=60.0))
    await store.insert_session(ahead)
    wait_s = loop.controller.config.overflow_after_s
    assert not [a for a in (await loop.step("open")).actions if isinstance(a, Place)]
    assert loop.view.waiting_since == {"new": 100.0 - waited_before_s, "ahead": 100.0}
    clock.now_s += wait_s - waited_before_s + 0.1  # due by its row; a wait counted from the restart is not
    placed = [a for a in (await loop.step("tick")).actions if isinstance(a, Place)]
    assert [(a.session_id, a.gpu_id) for a in placed] == [("new", "w1")] and "overflow" in placed[0].reason


class RunningClock(Clock):
    """The fake clock, running at wall speed, for a test of the loop's own sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self._started_s = time.monotonic()

    def __call__(self) -> float:
        return self.now_s + time.monotonic() - self._started_s


async def test_the_loop_wakes_when_a_waiting_session_comes_due_for_an_overflow_slot_not_a_period_later(
    store: MemoryStore,
) -> None:
    clock = RunningClock()
    loop = make_decider(store, clock, max_gpus=1, worker_timeout_s=600.0).loop  # its control period: 60 s
    await add_worker(store, loop, "w1")
    for index in range(4):
        await store.insert_session(session(f"full-{index}", "w1"))
    await store.insert_session(dataclasses.replace(session("new", None), epoch=0, chunks_produced=0))
    opened_s = clock()
    running = asyncio.create_task(loop.run())
    loop.trigger("open")
    try:
        async with asyncio.timeout(20.0):
            while (row := await store.get_session("new")) is None or row.worker_id is None:
                await asyncio.sleep(0.02)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    assert row.worker_id == "w1"
    assert clock() - opened_s >= loop.controller.config.overflow_after_s  # it waited its turn for a free slot


def test_the_view_bills_a_worker_from_when_it_was_asked_for_past_its_first_heartbeat() -> None:
    view = ClusterView(kinds=("cpu",), scale_kind="cpu", capacity=4)
    named = view.add_pending(["w1"], 1, now_s=10.0)
    (anonymous,) = view.add_pending([], 1, now_s=20.0)  # an external provisioner names its workers later
    assert named == ["w1"] and anonymous.startswith("pending-")
    assert {g: v.billed_since_s for g, v in view.gpu_views([], heard=()).items()} == {"w1": 10.0, anonymous: 20.0}
    for worker_id in ("w1", "w2"):
        view.observe(WorkerHeartbeat(worker_id, "cpu", "tiny", 4), now_s=40.0)
    rows = [WorkerRecord(w, "cpu", "tiny", 4, "live", False, 0, (), T0, T0) for w in ("w1", "w2", "w3")]
    gpus = view.gpu_views(rows, heard=("w1", "w2", "w3"))
    assert {g: v.billed_since_s for g, v in gpus.items()} == {"w1": 10.0, "w2": 20.0, "w3": None}
    view.forget_worker("w1")
    assert view.gpu_views(rows, heard=("w1",))["w1"].billed_since_s is None


async def test_a_scheduler_that_restarts_while_its_workers_start_neither_asks_again_nor_restarts_their_deadline(
    store: MemoryStore,
) -> None:
    journal = Journal()
    clock = Clock()

    def wall() -> datetime:
        return T0 + timedelta(seconds=clock.now_s)

    crashed = make_decider(store, clock, journal=journal, wall_clock=wall)
    await add_worker(store, crashed.loop, "w1")
    for index in range(6):
        await store.insert_session(session(f"s{index}", "w1" if index < 4 else None))
    await crashed.loop.step("open_session")
    asked_s = clock.now_s
    assert crashed.provisioner.started == 2 and set(await store.list_asks()) == {"new-1", "new-2"}

    clock.now_s += 20.0  # the scheduler died; its successor starts while both workers are still starting
    successor = make_decider(store, clock, journal=journal, wall_clock=wall)
    await add_worker(store, successor.loop, "w1")
    plan = await successor.loop.step("period")
    assert not any(isinstance(a, AddGpus) for a in plan.actions) and successor.provisioner.started == 0
    assert successor.loop.view.pending == {"new-1": None, "new-2": None}
    assert successor.loop.view.asked_at == pytest.approx({"new-1": asked_s, "new-2": asked_s})

    await add_worker(store, successor.loop, "new-1")
    clock.now_s = asked_s + 61.0  # past the provisioning timeout from the ask, not from the restart
    await successor.loop.step("period")
    assert ("remove", "new-2") in [e[:2] for e in journal.entries] and "new-2" not in successor.loop.view.pending
    recorded = await store.list_asks()
    assert "new-2" not in recorded and recorded["new-1"] == wall() - timedelta(seconds=61.0)  # billed from its ask


def test_recovered_asks_keep_a_placeholder_for_a_new_worker_not_for_one_that_was_live_before() -> None:
    view = ClusterView(kinds=("cpu",), scale_kind="cpu", capacity=4)
    wall_now = T0 + timedelta(seconds=500)
    asks = {"w1": T0, "pending-ab12": T0 + timedelta(seconds=470), "w2": T0 + timedelta(seconds=480)}
    view.recover_asks(asks, live={"w1", "w0"}, now_s=1000.0, wall_now=wall_now)
    assert list(view.pending) == ["pending-ab12", "w2"]
    assert view.asked_at == {"w1": 500.0, "pending-ab12": 970.0, "w2": 980.0}
    view.observe(WorkerHeartbeat("w0", "cpu", "tiny", 4), now_s=1001.0)  # live before the restart: answers nothing
    assert list(view.pending) == ["pending-ab12", "w2"]
    view.observe(WorkerHeartbeat("w7", "cpu", "tiny", 4), now_s=1002.0)  # new: the external system's answer
    assert list(view.pending) == ["w2"] and view.asked_at["w7"] == 970.0
    gone = [WorkerRecord("w1", "cpu", "tiny", 4, "lost", False, 0, (), T0, T0),
            WorkerRecord("w2", "cpu", "tiny", 4, "gone", False, 0, (), T0, T0)]
    view.forget_gone(gone)  # w1 lost is billed no more; w2, asked for again, is still waited for
    assert set(view.asked_at) == {"w7", "w2"}
    assert view.asks(1002.0, wall_now + timedelta(seconds=2))["w7"] == T0 + timedelta(seconds=470)


async def test_a_restarted_scheduler_sizes_from_what_its_predecessor_learnt_not_from_its_priors(
    store: MemoryStore, caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()

    def wall() -> datetime:
        return T0 + timedelta(seconds=clock.now_s)

    crashed = make_decider(store, clock, wall_clock=wall)
    sizing = crashed.loop.controller.autoscale
    assert isinstance(sizing, AnticipatoryHeadroom)
    for active in [0] * 30 + [9] * 40 + [0] * 30:  # a clump of nine ends a lull, then the pool empties again
        clock.now_s += 2.0
        sizing.target_gpus(WorkloadReading(DEFAULT_LEVELS[0], active, 0.0, 0.0, 0.0, now_s=clock.now_s), 4)
    assert sizing.bursts.clump_room() == 9
    await crashed.loop.step("period")  # keeps what it learnt at its first decision

    clock.now_s += 10.0  # the scheduler died; its successor starts within the lull
    successor = make_decider(store, clock, wall_clock=wall)
    await successor.loop.recover()
    relearnt = successor.loop.controller.autoscale
    assert isinstance(relearnt, AnticipatoryHeadroom) and relearnt.bursts.clump_room() == 9
    assert relearnt.bursts.overall_z == pytest.approx(sizing.bursts.overall_z)
    assert successor.loop.controller.budget.spent_frac == pytest.approx(crashed.loop.controller.budget.spent_frac)

    await store.save_learnt(crashed.loop.controller.name, {"version": 99}, wall())  # a newer scheduler's, say
    with caplog.at_level(logging.WARNING, logger="turboserve.scheduler.control"):
        unread = make_decider(store, clock, wall_clock=wall)
        await add_worker(store, unread.loop, "w1")
        await unread.loop.step("period")
    assert "event=learnt_ignored" in caplog.text
    assert isinstance(unread.loop.controller.autoscale, AnticipatoryHeadroom)
    assert unread.loop.controller.autoscale.bursts.clump_room() == 0  # its priors, and it still decides


POD = "turboserve-worker"


class Script:
    """A controller's decide that plays the given plans, one a round, then plans nothing."""

    def __init__(self, *plans: tuple[Action, ...]) -> None:
        self.plans = list(plans)

    def __call__(self, snapshot: ClusterSnapshot, now_s: float) -> Plan:
        return Plan(self.plans.pop(0) if self.plans else (), "stable", 0.0, len(snapshot.gpus))


def on_statefulset(store: MemoryStore, clock: Clock, api: FakeStatefulSetApi, monkeypatch: pytest.MonkeyPatch,
                   *plans: tuple[Action, ...]) -> tuple[Decider, Script]:
    """A decider acting through the Kubernetes provisioner on ``api``, whose controller plays ``plans``."""
    decider = make_decider(store, clock, max_gpus=4,
                           provisioner=KubernetesProvisioner(api, namespace="ts", statefulset=POD))
    script = Script(*plans)
    monkeypatch.setattr(decider.loop.controller, "decide", script)
    return decider, script


async def beat_all(store: MemoryStore, loop: ControlLoop, *ordinals: int) -> None:
    for ordinal in ordinals:
        await add_worker(store, loop, f"{POD}-{ordinal}")


async def test_a_pod_parked_below_the_top_stays_out_of_the_pool_past_its_grace_and_a_restart_until_asked_back(
    store: MemoryStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    api = FakeStatefulSetApi(3)
    crashed, _ = on_statefulset(store, clock, api, monkeypatch, (RemoveGpu(f"{POD}-1", "scale in"),))
    await beat_all(store, crashed.loop, 0, 1, 2)
    await crashed.loop.step("period")
    assert api.replicas == 3 and crashed.loop.view.retired == {f"{POD}-1": math.inf}  # parked: 2 still serves
    clock.now_s += 40.0  # past the retire grace, and the parked pod still beats
    await beat_all(store, crashed.loop, 0, 1, 2)
    await crashed.loop.step("period")
    assert sorted(crashed.loop.snapshot.gpus) == [f"{POD}-0", f"{POD}-2"]

    # the scheduler restarts: nothing of the first is in memory
    successor, _ = on_statefulset(store, clock, api, monkeypatch, (), (AddGpus("cpu", 1, "load rose"),))
    await beat_all(store, successor.loop, 0, 1, 2)
    await successor.loop.step("period")
    assert sorted(successor.loop.snapshot.gpus) == [f"{POD}-0", f"{POD}-2"]
    await successor.loop.step("period")  # the ask takes the running pod back before adding an ordinal
    assert api.replicas == 3 and list(successor.loop.view.pending) == [f"{POD}-1"]
    await beat_all(store, successor.loop, 0, 1, 2)
    assert not successor.loop.view.pending
    clock.now_s += 61.0  # past the provisioning timeout: a worker that answered is not given up
    await beat_all(store, successor.loop, 0, 1, 2)
    await successor.loop.step("period")
    assert sorted(successor.loop.snapshot.gpus) == [f"{POD}-0", f"{POD}-1", f"{POD}-2"] and api.replicas == 3


async def test_a_top_ordinal_removed_and_asked_for_again_joins_the_pool_when_it_beats(
    store: MemoryStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    api = FakeStatefulSetApi(2)
    decider, script = on_statefulset(store, clock, api, monkeypatch, (RemoveGpu(f"{POD}-1", "scale in"),))
    await beat_all(store, decider.loop, 0, 1)
    await decider.loop.step("period")
    assert api.replicas == 1
    clock.now_s += 10.0
    script.plans.append((AddGpus("cpu", 1, "load rose"),))
    await beat_all(store, decider.loop, 0)
    await decider.loop.step("period")
    assert api.replicas == 2 and list(decider.loop.view.pending) == [f"{POD}-1"]
    await beat_all(store, decider.loop, 0, 1)  # the same pod name, a new pod
    clock.now_s += 61.0
    await beat_all(store, decider.loop, 0, 1)
    await decider.loop.step("period")
    assert api.replicas == 2 and sorted(decider.loop.snapshot.gpus) == [f"{POD}-0", f"{POD}-1"]


async def test_a_deposed_scheduler_acts_on_no_plan(store: MemoryStore) -> None:
    async def deposed() -> None:
        raise LeadershipLost("another scheduler took the lead")

    decider = make_decider(store, Clock(), confirm_lead=deposed)
    await add_worker(store, decider.loop, "w1")
    for index in range(6):
        await store.insert_session(session(f"s{index}", None))
    with pytest.raises(LeadershipLost):
        await decider.loop.step("open_session")
    assert not decider.journal.entries and not decider.io.placements and not await store.list_asks()
    assert all(row.worker_id is None for row in await store.list_sessions())
