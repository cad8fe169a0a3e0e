"""Randomized invariants every registered policy keeps, on random clusters (hypothesis)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.scheduler.policy.actions import Migrate, Plan, RemoveGpu
from services.scheduler.policy.apply import apply_plan
from services.scheduler.policy.registry import PolicySetting, build_controller
from services.scheduler.policy.snapshot import ClusterSnapshot, GpuView, SessionView

POLICY_NAMES = ("ours", "paper", "ours_no_migration", "round_robin", "least_loaded", "by_memory", "fixed")
NOW_S = 1000.0


@st.composite
def clusters(draw: st.DrawFn) -> ClusterSnapshot:
    """Up to 8 GPUs (some provisioning, some draining) with sessions respecting capacity, plus waiting ones."""
    snapshot = ClusterSnapshot()
    gpu_count = draw(st.integers(1, 8))
    for index in range(gpu_count):
        ready_at_s = draw(st.sampled_from((0.0, 0.0, 0.0, NOW_S + 20.0)))
        draining = draw(st.booleans()) if index > 0 else False
        snapshot.upsert_gpu(GpuView(f"g{index}", "h100", 4, ready_at_s, draining and ready_at_s == 0.0))
    counter = 0
    for index in range(gpu_count):
        if snapshot.gpus[f"g{index}"].ready_at_s > NOW_S:
            continue
        for _ in range(draw(st.integers(0, 4))):
            active = draw(st.booleans()) or draw(st.booleans())
            moved = draw(st.sampled_from((None, NOW_S - 5.0, NOW_S - 500.0)))
            size = draw(st.sampled_from((1_000_000_000, 3_500_000_000, 6_000_000_000)))
            snapshot.upsert_session(SessionView(f"s{counter}", size, active, f"g{index}", moved))
            counter += 1
    for _ in range(draw(st.integers(0, 12))):
        offloaded = draw(st.booleans())
        active = draw(st.booleans()) or not offloaded
        snapshot.upsert_session(SessionView(f"s{counter}", 3_500_000_000, active, None, None, offloaded))
        counter += 1
    return snapshot


def decide_and_apply(name: str, snapshot: ClusterSnapshot) -> Plan:
    setting = PolicySetting(fixed_gpus=4)
    controller = build_controller(name, setting)
    plan = controller.decide(snapshot, NOW_S)
    apply_plan(snapshot, plan, NOW_S, setting.provisioning_delay_s, setting.models().latency)
    return plan


def usable_slots(snapshot: ClusterSnapshot) -> int:
    return sum(g.capacity for g in snapshot.gpus.values() if g.ready_at_s <= NOW_S and not g.draining)


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(clusters(), st.sampled_from(POLICY_NAMES))
def test_no_gpu_ever_holds_more_sessions_than_its_capacity(snapshot: ClusterSnapshot, name: str) -> None:
    decide_and_apply(name, snapshot)
    for gpu_id, members in snapshot.residents.items():
        assert len(members) <= snapshot.gpus[gpu_id].capacity


@SETTINGS
@given(clusters(), st.sampled_from(POLICY_NAMES))
def test_every_active_session_is_placed_whenever_total_capacity_allows(snapshot: ClusterSnapshot, name: str) -> None:
    fits = snapshot.active_count <= usable_slots(snapshot)
    decide_and_apply(name, snapshot)
    if fits:
        assert not snapshot.waiting


@SETTINGS
@given(clusters(), st.sampled_from(("ours", "paper")))
def test_no_rebalancing_migration_has_a_gain_below_the_threshold(snapshot: ClusterSnapshot, name: str) -> None:
    plan = decide_and_apply(name, snapshot)
    for action in plan.actions:
        if isinstance(action, Migrate) and action.reason.startswith("min-max"):
            assert action.gain_ms >= 5.0


@SETTINGS
@given(clusters(), st.sampled_from(POLICY_NAMES))
def test_scale_in_never_loses_a_session(snapshot: ClusterSnapshot, name: str) -> None:
    before = {sid: s.active for sid, s in snapshot.sessions.items()}
    plan = decide_and_apply(name, snapshot)
    assert {sid: s.active for sid, s in snapshot.sessions.items()} == before
    removed = {a.gpu_id for a in plan.actions if isinstance(a, RemoveGpu)}
    assert all(s.gpu_id not in removed for s in snapshot.sessions.values())


@SETTINGS
@given(clusters(), st.sampled_from(POLICY_NAMES))
def test_plans_are_deterministic_for_the_same_input(snapshot: ClusterSnapshot, name: str) -> None:
    copy = ClusterSnapshot.build(snapshot.sessions.values(), snapshot.gpus.values())
    setting = PolicySetting(fixed_gpus=4)
    first = build_controller(name, setting).decide(snapshot, NOW_S)
    second = build_controller(name, setting).decide(copy, NOW_S)
    assert first == second
