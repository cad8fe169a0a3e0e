"""Migrations priced by bytes, overflow slots rather than waits, and the time to a session's first chunk."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from services.scheduler.policy.actions import Action, Migrate, Place, Plan, Restore
from services.scheduler.policy.autoscale import FixedAllocation
from services.scheduler.policy.controller import EVACUATION_TRIES, ControllerConfig, ControllerConfigError
from services.scheduler.policy.cost_models import LatencyModel, MigrationCostModel
from services.scheduler.policy.registry import PolicySetting, build_controller
from services.scheduler.policy.snapshot import ClusterSnapshot, GpuView, SessionView, SnapshotError
from services.scheduler.policy.workspace import Workspace
from services.scheduler.sim.engine import SimConfig, Simulator
from services.scheduler.sim.results import SimResult
from services.scheduler.sim.trace import SessionTrace, Trace

GB = 1_000_000_000
FULL_MS = 180.0 + 3 * 55.0 + 18.0  # l(4) on the reference curve


def gpus(loads: list[int], nodes: list[str] | None = None, waiting: int = 0, since_s: float = 0.0,
         overflow_slots: int = 1) -> ClusterSnapshot:
    snapshot = ClusterSnapshot()
    counter = 0
    for index, load in enumerate(loads):
        node = nodes[index] if nodes else ""
        snapshot.upsert_gpu(GpuView(f"g{index}", "h100", 4, 0.0, node=node, overflow_slots=overflow_slots))
        for _ in range(load):
            snapshot.upsert_session(SessionView(f"s{counter}", 4 * GB, True, f"g{index}"))
            counter += 1
    for _ in range(waiting):
        snapshot.upsert_session(SessionView(f"w{counter}", 4 * GB, True, None, waiting_since_s=since_s))
        counter += 1
    return snapshot


@pytest.mark.parametrize("bad", [{"target_ms": 0.0}, {"overflow_slots": -1}, {"overflow_after_s": -0.5}])
def test_a_controller_setting_no_decision_can_use_is_a_typed_error(bad: dict[str, float]) -> None:
    with pytest.raises(ControllerConfigError):
        ControllerConfig("h100", **bad)  # type: ignore[arg-type]
    ControllerConfig("h100", overflow_slots=4, overflow_after_s=0.0)  # no wait at all is a setting


def test_a_migration_costs_its_bytes_over_the_link_between_the_two_gpus() -> None:
    model = MigrationCostModel(5.0, same_node_gigabytes_per_s=200.0, cross_node_gigabytes_per_s=50.0)
    assert model.cost_ms(4 * GB, same_node=True) == pytest.approx(25.0)
    assert model.cost_ms(4 * GB) == pytest.approx(85.0)  # unknown nodes: the slower link
    for _ in range(200):
        model.observe(4 * GB, 165.0)  # the network turned out half as fast
    assert model.cost_ms(4 * GB) == pytest.approx(165.0, rel=0.02)
    assert model.cost_ms(4 * GB, same_node=True) == pytest.approx(25.0)


def test_late_chunks_count_the_mover_and_both_gpus_batches_held_up_by_the_transfer() -> None:
    snapshot = gpus([4, 2, 3], nodes=["a", "b", "a"])
    workspace = Workspace(snapshot, LatencyModel(dict(PolicySetting().curves)), 0.0)
    assert workspace.same_node("g0", "g2") and not workspace.same_node("g0", "g1")
    # 3 stay on g0 at l(3) + 85 = 385 ms: in time; g1 then runs 3 at l(3) + 85: in time
    assert workspace.migration_late_chunks("g0", "g1", 85.0, 400.0) == 0
    # g2 then runs 4 at l(4) + 85 = 448 ms: all four of its chunks late
    assert workspace.migration_late_chunks("g0", "g2", 85.0, 400.0) == 4
    # within the node the transfer takes 25 ms: 388 ms, in time
    assert workspace.migration_late_chunks("g0", "g2", 25.0, 400.0) == 0


def consolidation_moves(nodes: list[str]) -> list[tuple[str, str]]:
    """The moves ours makes to give back one of two GPUs holding 3 and 1 sessions, when one GPU would do."""
    controller = build_controller("ours", PolicySetting())
    controller.autoscale = FixedAllocation(1)
    controller.autoscale.hold_s = 0.0
    plan = controller.decide(gpus([3, 1], nodes=nodes), 0.0)  # no hold: the first decision scales in
    return [(a.session_id, a.target_gpu_id) for a in plan.actions if isinstance(a, Migrate)]


def test_priced_consolidation_moves_nothing_that_would_push_a_chunk_over_target() -> None:
    # across nodes the move joins g0's three at l(4) + 85 ms > 400: four chunks late, so g1 stays
    assert consolidation_moves(["a", "b"]) == []
    # within the node it takes 25 ms: in time
    assert consolidation_moves(["a", "a"]) == [("s3", "g0")]


def test_a_session_takes_an_overflow_slot_only_after_waiting_and_gives_it_back_when_a_slot_frees() -> None:
    controller = build_controller("ours", PolicySetting(overflow_after_s=3.0))
    early = controller.decide(gpus([4, 4], waiting=1, since_s=99.0), 100.0)
    assert not any(isinstance(a, (Place, Restore)) for a in early.actions)
    snapshot = gpus([4, 4], waiting=1, since_s=96.0)
    placed = [a for a in controller.decide(snapshot, 100.0).actions if isinstance(a, Place)]
    assert len(placed) == 1 and "overflow" in placed[0].reason
    snapshot.upsert_session(SessionView("w8", 4 * GB, True, placed[0].gpu_id))
    other = "g1" if placed[0].gpu_id == "g0" else "g0"
    leaving = next(iter(snapshot.residents[other]))
    snapshot.upsert_session(SessionView(leaving, 4 * GB, False, None, offloaded=True))
    relief = [a for a in controller.decide(snapshot, 101.0).actions if isinstance(a, Migrate)]
    assert [(m.source_gpu_id, m.target_gpu_id) for m in relief] == [(placed[0].gpu_id, other)]


def test_an_overflow_goes_to_the_gpu_least_past_capacity_and_costs_only_the_chunks_past_it() -> None:
    controller = build_controller("ours", PolicySetting(overflow_after_s=3.0))
    placed = [a for a in controller.decide(gpus([5, 4, 6], waiting=1, overflow_slots=4), 100.0).actions
              if isinstance(a, Place)]
    # wherever it lands, one more chunk an interval is late; on g1 it shares the second forward with nobody
    assert [p.gpu_id for p in placed] == ["g1"]
    curve = PolicySetting().curves["h100"]
    assert curve.late_chunks(5, 0.0, 400.0) == 1 and curve.late_chunks(7, 0.0, 400.0) == 3
    full = controller.decide(gpus([8, 8, 8], waiting=1, overflow_slots=4), 100.0).actions
    assert not [a for a in full if isinstance(a, Place)]


def test_an_overflowing_gpu_still_streams_in_real_time() -> None:
    setting = PolicySetting()
    curve = setting.curves[setting.scale_kind]
    assert curve.chunk_latency_ms(curve.capacity + setting.overflow_slots) < 750.0  # a chunk's play time
    assert SimConfig().overflow_slots == setting.overflow_slots


def test_policies_without_the_rule_leave_the_session_waiting() -> None:
    for name in ("ours_no_overflow", "paper"):
        plan = build_controller(name, PolicySetting(rho=0.9)).decide(gpus([4, 4], waiting=1, since_s=0.0), 100.0)
        assert not any(isinstance(a, (Place, Restore)) for a in plan.actions)


def test_a_gpu_holds_no_more_than_its_capacity_and_overflow_slots() -> None:
    snapshot = gpus([4], overflow_slots=1)
    snapshot.upsert_session(SessionView("x", GB, True, "g0"))
    with pytest.raises(SnapshotError):
        snapshot.upsert_session(SessionView("y", GB, True, "g0"))


def test_an_overflowing_gpu_spends_the_budget_of_its_sessions_past_capacity_only() -> None:
    overflowing = build_controller("ours", PolicySetting())
    waiting = build_controller("ours_no_overflow", PolicySetting())
    for now_s in (100.0, 160.0):
        overflowing.decide(gpus([5, 4], overflow_slots=1), now_s)  # nine active, one in a second forward
        waiting.decide(gpus([4, 4], waiting=1, since_s=now_s), now_s)  # nine active, one waiting
    assert overflowing.budget.spent_frac == pytest.approx(waiting.budget.spent_frac)


@dataclass
class OneMove:
    """A controller stand-in: s0-s2 on one GPU, s3 on the other, and at 30 s s3 joins the first three, so the
    simulator's accounting of one migration can be checked on its own."""

    config: ControllerConfig = field(default_factory=lambda: ControllerConfig("h100"))
    name: str = "one-move"
    initial_gpus: int = 2
    moved: bool = False

    def decide(self, snapshot: ClusterSnapshot, now_s: float) -> Plan:
        actions: list[Action] = [Place(s, "init00001" if s == "s3" else "init00000", "") for s in snapshot.waiting]
        if now_s >= 30.0 and not self.moved:
            self.moved = True
            actions.append(Migrate("s3", "init00001", "init00000", 0.0, ""))
        return Plan(tuple(actions), "stable", 0.0, 2)


def one_move(gpus_per_node: int) -> SimResult:
    trace = Trace("t", tuple(SessionTrace(f"s{i}", ((0.0, 60.0),), 60.0, 4 * GB) for i in range(4)), 0.0, 60.0)
    models = PolicySetting().models()
    return Simulator(trace, OneMove(), SimConfig(gpus_per_node=gpus_per_node), models.latency,  # type: ignore[arg-type]
                     models.migration, models.restore).run()


def test_the_simulator_charges_a_migration_to_the_mover_and_both_gpus_next_batch() -> None:
    across = one_move(gpus_per_node=1)
    # g0 then holds 4: each of their next chunks waits out the 85 ms transfer on top of l(4)
    assert across.worst_latency_ms == pytest.approx(FULL_MS + 85.0)
    assert across.counters["migrations"] == 1 and across.counters["migrated_bytes"] == 4 * GB
    assert across.over_target_frac * across.total_chunks == pytest.approx(4.0)
    within = one_move(gpus_per_node=8)
    assert within.worst_latency_ms == pytest.approx(FULL_MS + 25.0)
    assert within.over_target_frac == 0.0


def test_time_to_first_chunk_is_the_wait_plus_the_first_chunk() -> None:
    first = tuple(SessionTrace(f"s{i}", ((0.0, 50.0 if i == 0 else 600.0),), 600.0, 4 * GB) for i in range(4))
    late = SessionTrace("late", ((10.0, 600.0),), 600.0, 4 * GB)
    never = SessionTrace("never", ((20.0, 30.0),), 40.0, 4 * GB)
    setting = PolicySetting(fixed_gpus=1)
    models = setting.models()
    result = Simulator(Trace("t", (*first, late, never), 0.0, 600.0), build_controller("fixed", setting),
                       SimConfig(overflow_slots=0), models.latency, models.migration, models.restore).run()
    curve = models.latency.curve("h100")
    # the four first fill the GPU one by one; "never" gives up after 10 s; "late" gets s0's slot at 50 s
    expected = sorted([curve.chunk_latency_ms(n) / 1000 for n in (1, 2, 3, 4)] + [10.0, 40.0 + FULL_MS / 1000])
    assert result.first_chunk_s == pytest.approx(expected)
    assert result.counters["unserved_opens"] == 1
    assert result.first_chunk_quantile_s(1.0) == pytest.approx(40.0 + FULL_MS / 1000)
    # the chunks the two waits owed, late by more than a chunk's own 0.75 s, are the ones a player stalls on
    assert 0.0 < result.over_interval_frac < result.over_target_frac


def test_a_scale_in_whose_moves_are_all_refused_stops_after_a_few_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    controller = build_controller("ours", PolicySetting())
    controller.autoscale = FixedAllocation(1)
    controller.autoscale.hold_s = 0.0
    snapshot = gpus([3] * 80, nodes=[f"n{i}" for i in range(80)])  # every move would make a 4th across nodes
    tried: list[str] = []
    evacuate = controller._evacuate

    def counted(workspace: Workspace, gpu_id: str, why: str) -> list[Migrate] | None:
        tried.append(gpu_id)
        return evacuate(workspace, gpu_id, why)

    monkeypatch.setattr(controller, "_evacuate", counted)
    plan = controller.decide(snapshot, 0.0)
    assert not any(isinstance(a, Migrate) for a in plan.actions)
    assert len(tried) == EVACUATION_TRIES


def test_sessions_on_an_overflowing_gpu_spend_the_violation_budget_as_a_wait_does() -> None:
    controller = build_controller("ours", PolicySetting())
    before = controller.budget.spent_frac
    snapshot = gpus([5, 4], overflow_slots=1)  # g0 holds one past its capacity, in a second forward
    for now_s in (100.0, 160.0):
        controller.decide(snapshot, now_s)
    assert controller.budget.spent_frac > before
    calm = build_controller("ours", PolicySetting())
    for now_s in (100.0, 160.0):
        calm.decide(gpus([4, 4], overflow_slots=1), now_s)
    assert calm.budget.spent_frac < before
