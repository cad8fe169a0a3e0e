"""The live control loop against the in-memory store and fakes of the StateMover, the Provisioner and NATS:
snapshot in, plan executed in order, every action with its reason, bounds kept, nothing dropped by a scale-in."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from services.common.control import MigrationReport
from services.common.errors import InvalidField
from services.common.messages import Placement, WorkerHeartbeat
from services.common.wire import decode, encode
from services.scheduler.cluster_view import sync
from services.scheduler.control_loop import ControlLoop
from services.scheduler.control_settings import ControlSettings, build_live_controller
from services.scheduler.placement import WorkerLoad
from services.scheduler.policy import (
    AddGpus,
    ClusterSnapshot,
    DrainGpu,
    GpuView,
    Migrate,
    Offload,
    Place,
    RemoveGpu,
    Restore,
    SessionView,
)
from services.scheduler.store.memory import MemoryStore
from services.scheduler.store.protocol import SessionRecord, WorkerReport

T0 = datetime(2026, 11, 22, 4, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


class Journal:
    """What the fakes were asked to do, in order, so tests can check the order across them."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, ...]] = []


class FakeMover:
    def __init__(self, store: MemoryStore, journal: Journal, *, fail: bool = False) -> None:
        self.store, self.journal, self.fail = store, journal, fail

    async def offload(self, session_id: str, worker_id: str, epoch: int, reason: str) -> bool:
        self.journal.entries.append(("offload", session_id, worker_id, reason))
        return True

    async def migrate(self, session_id: str, source: str, target: str, epoch: int, reason: str) -> MigrationReport:
        self.journal.entries.append(("migrate", session_id, source, target, reason))
        if self.fail:
            return MigrationReport(session_id, epoch, source, target, "failed", detail="refused")
        row = await self.store.get_session(session_id)
        assert row is not None
        await self.store.move_session(session_id, expected_epoch=epoch, worker_id=target, status=row.status, at=T0)
        return MigrationReport(session_id, epoch, source, target, "copied", pause_ms=30.0, state_bytes=10**6)


class FakeProvisioner:
    """Checks the scale-in invariant at the moment of removal: no open session is left on the worker."""

    def __init__(self, store: MemoryStore, journal: Journal) -> None:
        self.store, self.journal = store, journal
        self.started = 0

    async def scale_out(self, count: int, reason: str) -> Sequence[str]:
        ids = [f"new-{self.started + i + 1}" for i in range(count)]
        self.started += count
        self.journal.entries.append(("scale_out", str(count), reason))
        return ids

    async def remove(self, worker_id: str, reason: str) -> None:
        left = [s.session_id for s in await self.store.list_sessions() if s.worker_id == worker_id]
        assert not left, f"removing {worker_id} would drop {left}"
        self.journal.entries.append(("remove", worker_id, reason))
        await self.store.retire_worker(worker_id, "gone")

    async def close(self) -> None:
        pass


class FakeIO:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.placements: list[Placement] = []

    async def publish_placement(self, placement: Placement) -> None:
        self.placements.append(placement)

    async def drain(self, worker_id: str, reason: str) -> str:
        self.journal.entries.append(("drain", worker_id, reason))
        return "ok"


def session(session_id: str, worker_id: str | None, status: str = "active") -> SessionRecord:
    return SessionRecord(session_id, "owner", "a fox", 1, "tiny", status, worker_id, 1, 3, 3, T0, T0)  # type: ignore[arg-type]


async def add_worker(store: MemoryStore, loop: ControlLoop, worker_id: str, offloaded: tuple[str, ...] = ()) -> None:
    await store.upsert_worker(WorkerReport(worker_id, "cpu", "tiny", 4, 0, False, T0, ()), T0)
    loop.observe_heartbeat(WorkerHeartbeat(worker_id, "cpu", "tiny", 4, offloaded=offloaded))


def make_loop(store: MemoryStore, journal: Journal, clock: Clock, *, fail_moves: bool = False,
              max_gpus: int = 3, offload_after_s: float = 0.0) -> tuple[ControlLoop, FakeProvisioner, FakeIO]:
    settings = ControlSettings(min_gpus=1, max_gpus=max_gpus, scale_in_hold_s=0.0, detector_window_s=10.0,
                               worker_kind="cpu", worker_capacity=4, provision_timeout_s=60.0)
    provisioner, io = FakeProvisioner(store, journal), FakeIO(journal)
    loop = ControlLoop(store, build_live_controller(settings), FakeMover(store, journal, fail=fail_moves),
                       provisioner, io, control_period_s=2.0, provision_timeout_s=60.0, retire_grace_s=30.0,
                       max_gpus=max_gpus, offload_after_s=offload_after_s, clock=clock, wall_clock=lambda: T0)
    return loop, provisioner, io


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


def test_open_and_resume_are_placed_by_the_controllers_rule_and_never_on_a_draining_or_full_worker(
    store: MemoryStore,
) -> None:
    loop, _, _ = make_loop(store, Journal(), Clock())
    loop.view.draining.add("w2")
    loads = [WorkerLoad("w1", "tiny", 4, 4, True), WorkerLoad("w2", "tiny", 4, 0, True),
             WorkerLoad("w3", "tiny", 4, 1, True), WorkerLoad("w4", "tiny", 4, 0, False)]
    choice = loop.place(loads, model="tiny")
    assert choice.worker_id == "w3" and choice.reason.startswith("ours placement: ")
    assert loop.place(loads[:2], model="tiny").worker_id is None


def test_measured_batch_latencies_from_heartbeats_refit_the_latency_model(store: MemoryStore) -> None:
    loop, _, _ = make_loop(store, Journal(), Clock())
    before = loop.controller.models.latency.curve("cpu").chunk_latency_ms(2)
    for _ in range(50):
        loop.observe_heartbeat(WorkerHeartbeat("w1", "cpu", "tiny", 4, recent_batches=((2, 900.0), (1, 700.0))))
    assert loop.controller.models.latency.curve("cpu").chunk_latency_ms(2) > before + 300


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
