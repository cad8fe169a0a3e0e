"""Our autoscaler's headroom: the burst memory (how far the load has risen within a provisioning horizon) and the
violation budget (how much of the over-target allowance waits have spent), alone and inside the controller."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scheduler.policy.actions import RemoveGpu, Restore
from services.scheduler.policy.autoscale import AutoscaleError, RecentRiseHeadroom
from services.scheduler.policy.budget import BudgetError, BudgetParams, ViolationBudget
from services.scheduler.policy.bursts import BurstMemory, BurstMemoryError, BurstParams, RecentRises
from services.scheduler.policy.detector import DEFAULT_LEVELS, WorkloadReading
from services.scheduler.policy.registry import PolicySetting, build_controller
from services.scheduler.policy.snapshot import ClusterSnapshot, GpuView, SessionView

GB = 1_000_000_000
STEPS = st.lists(st.tuples(st.floats(0.1, 600.0), st.integers(0, 500), st.integers(0, 500)), max_size=40)


def reading(active: int, now_s: float) -> WorkloadReading:
    return WorkloadReading(DEFAULT_LEVELS[0], active, 0.0, 0.0, 0.0, now_s=now_s)


def spend(budget: ViolationBudget, steps: list[tuple[float, int, int]]) -> ViolationBudget:
    now_s = 0.0
    for span_s, active, waiting in steps:
        budget.record(now_s, active, waiting)
        now_s += span_s
    budget.record(now_s, 0, 0)
    return budget


def test_far_under_budget_the_headroom_share_falls_to_its_floor() -> None:
    budget = spend(ViolationBudget(), [(10.0, 100, 0)] * 720)
    assert budget.spent_frac < 1e-5
    assert budget.headroom_scale() == pytest.approx(BudgetParams().min_scale)


def test_spending_the_budget_as_aimed_keeps_the_full_headroom() -> None:
    params = BudgetParams()
    aimed = params.budget_frac * params.aim
    budget = spend(ViolationBudget(params), [(1.0 / aimed, 1, 1), (1.0 / aimed, 1, 0)] * 200)
    assert budget.headroom_scale() == pytest.approx(1.0, abs=0.02)


def test_each_interval_is_accounted_at_the_counts_that_held_during_it() -> None:
    budget = ViolationBudget(BudgetParams(prior_session_s=1e-9, window_s=1e12))
    budget.record(0.0, 10, 5)
    budget.record(100.0, 10, 0)
    budget.record(200.0, 10, 0)
    assert budget.spent_frac == pytest.approx(500.0 / 2000.0)


@settings(max_examples=80, deadline=None)
@given(STEPS)
def test_the_headroom_share_always_stays_within_its_bounds(steps: list[tuple[float, int, int]]) -> None:
    params = BudgetParams()
    assert params.min_scale <= spend(ViolationBudget(params), steps).headroom_scale() <= params.max_scale


@settings(max_examples=80, deadline=None)
@given(STEPS, st.integers(0, 50))
def test_more_waiting_never_buys_less_headroom(steps: list[tuple[float, int, int]], extra: int) -> None:
    worse = [(span_s, active, waiting + extra) for span_s, active, waiting in steps]
    assert spend(ViolationBudget(), worse).headroom_scale() >= spend(ViolationBudget(), steps).headroom_scale()


def feed(memory: BurstMemory, pattern: list[int], step_s: float = 1.0) -> BurstMemory:
    for index, active in enumerate(pattern):
        memory.record(index * step_s, active)
    return memory


def test_a_workload_whose_arrivals_clump_reads_a_larger_rise_than_a_steady_one() -> None:
    steady = [100 + (second % 3) for second in range(4 * 3600)]
    clumped = [140 if second % 600 < 60 else 100 for second in range(4 * 3600)]
    params = BurstParams(prior_s=1.0)
    assert feed(BurstMemory(params), clumped).rise_z(100) > 2.0 > feed(BurstMemory(params), steady).rise_z(100)


def test_each_load_band_reads_its_own_tail_so_night_clumps_do_not_staff_the_day() -> None:
    night = [2 + (12 if second % 600 < 30 else 0) for second in range(2 * 3600)]
    day = [200 + (second % 5) for second in range(2 * 3600)]
    memory = feed(BurstMemory(BurstParams(prior_s=60.0)), night + day + night + day)
    assert memory.rise_z(2) > 4.0  # +12 on 2: z = 8.5, 5% of the night's time
    assert memory.rise_z(200) < 1.0 < memory.overall_z
    assert memory.rise_z(5000) == memory.overall_z  # a load never seen reads every band's tail


def test_around_a_lull_the_memory_keeps_room_for_the_whole_largest_clump_from_empty() -> None:
    params = BurstParams(horizon_s=40.0, window_s=3 * 3600.0, prior_s=60.0)
    lull_clump_lull = [0] * 600 + [14] * 300 + [0] * (2 * 3600)
    memory = feed(BurstMemory(params), lull_clump_lull)
    assert memory.rise_z(0) < 1.0  # the time-weighted tail alone reads ~0 after two hours of nothing
    assert memory.clump_room() == 14
    end_s = float(len(lull_clump_lull))
    memory.record(end_s + 20.0, 3)  # the next clump is arriving: keep the room
    assert memory.clump_room() == 14
    memory.record(end_s + 60.0, 3)  # a horizon with sessions since the pool was empty: arrivals are continuous
    assert memory.clump_room() == 0
    memory.record(5 * 3600.0, 0)  # past the window the 14 is forgotten; the clump of 3 after it is the largest
    assert memory.clump_room() == 3


def test_an_empty_pool_after_a_clump_is_sized_for_the_whole_clump_however_small_the_coverage() -> None:
    sizing = build_controller("ours", PolicySetting(burst_coverage=0.1)).autoscale
    for second in range(1200):
        active = 23 if 600 <= second < 900 else 0
        count, reason = sizing.target_gpus(reading(active, float(second)), 4)
    assert count == 6 and "clump of 23" in reason  # ceil(23 / 4): the 0.1 share of the burst tail would say 2


def test_a_rise_counts_only_once_its_horizon_has_passed() -> None:
    params = BurstParams(horizon_s=40.0, prior_z=3.0)
    memory = feed(BurstMemory(params), [10] * 30 + [60] * 10)
    assert memory.rise_z(10) == pytest.approx(3.0)
    memory.record(100.0, 60)
    assert memory.rise_z(10) > 3.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 400), min_size=1, max_size=300))
def test_the_burst_coefficient_is_bounded_and_the_same_for_the_same_history(pattern: list[int]) -> None:
    params = BurstParams(horizon_s=10.0)
    first, second = feed(BurstMemory(params), pattern), feed(BurstMemory(params), pattern)
    for active in {0, *pattern}:
        assert first.rise_z(active) == second.rise_z(active)
        assert 0.0 <= first.rise_z(active) <= params.max_z + params.bin_z
    assert first.clump_room() == second.clump_room()
    assert 0 <= first.clump_room() <= max(pattern)


def test_bad_budget_and_burst_settings_raise_typed_errors() -> None:
    with pytest.raises(BudgetError):
        BudgetParams(budget_frac=0.0)
    with pytest.raises(BudgetError):
        BudgetParams(min_scale=1.2, max_scale=1.0)
    with pytest.raises(BurstMemoryError):
        BurstParams(quantile=1.0)
    with pytest.raises(BurstMemoryError):
        BurstParams(horizon_s=0.0)


def steady_cluster(active: int, gpus: int) -> ClusterSnapshot:
    snapshot = ClusterSnapshot()
    for index in range(gpus):
        snapshot.upsert_gpu(GpuView(f"g{index}", "h100", 4, 0.0))
    for index in range(active):
        snapshot.upsert_session(SessionView(f"s{index}", 3 * GB, True, f"g{index % gpus}"))
    return snapshot


def test_ours_keeps_fewer_spare_gpus_after_a_long_calm_without_waits() -> None:
    controller = build_controller("ours", PolicySetting())
    snapshot = steady_cluster(active=64, gpus=24)
    first = controller.decide(snapshot, 0.0)
    for second in range(10, 4 * 3600, 10):
        last = controller.decide(steady_cluster(active=64, gpus=24), float(second))
    assert last.target_gpus < first.target_gpus
    assert last.target_gpus >= 16


def test_scale_in_cancels_the_gpu_furthest_from_ready_first() -> None:
    snapshot = steady_cluster(active=4, gpus=1)
    snapshot.upsert_gpu(GpuView("soon", "h100", 4, 105.0))
    snapshot.upsert_gpu(GpuView("late", "h100", 4, 125.0))
    controller = build_controller("paper", PolicySetting(rho=0.9))
    controller.decide(snapshot, 96.0)
    plan = controller.decide(snapshot, 102.0)
    removed = [a.gpu_id for a in plan.actions if isinstance(a, RemoveGpu)]
    assert removed[0] == "late"


def test_with_no_session_active_the_pool_still_covers_a_clump_of_the_size_seen() -> None:
    controller = build_controller("ours", PolicySetting(burst_coverage=3.0))  # beta = 3 x the prior's 3
    plan = controller.decide(steady_cluster(active=0, gpus=1), 0.0)
    assert plan.target_gpus == 3  # nine slots for a rise from nothing, where sqrt(0) would keep none


def test_at_low_load_the_pool_keeps_a_warm_spare_gpu() -> None:
    for active, target in ((0, 1), (3, 2), (4, 2), (5, 3)):
        controller = build_controller("ours", PolicySetting(burst_coverage=0.0))
        assert controller.decide(steady_cluster(active=active, gpus=2), 0.0).target_gpus == target
    with pytest.raises(AutoscaleError, match="spare_gpus=-1"):
        build_controller("ours", PolicySetting(spare_gpus=-1))


def test_a_resume_whose_restore_makes_its_first_chunk_late_spends_the_budget() -> None:
    def spent_after_resume(gpus: int, restore_layers: int = 1) -> float:
        controller = build_controller("ours", PolicySetting(restore_layers=restore_layers))
        snapshot = steady_cluster(active=3, gpus=1)
        for index in range(1, gpus):
            snapshot.upsert_gpu(GpuView(f"g{index}", "h100", 4, 0.0))
        snapshot.upsert_session(SessionView("back", 4 * GB, True, None, offloaded=True, waiting_since_s=100.0))
        before = controller.budget.spent_frac
        plan = controller.decide(snapshot, 100.0)
        assert [a.session_id for a in plan.actions if isinstance(a, Restore)] == ["back"]
        return controller.budget.spent_frac - before

    # landing whole, beside 3 sessions the 73 ms restore puts its first chunk at 436 ms; alone on a GPU, 253 ms
    assert spent_after_resume(gpus=1) > 0.0
    assert spent_after_resume(gpus=2) <= 0.0
    # streamed in per layer under the first DiT pass, it adds 20 ms beside 3 sessions: 383 ms, on time
    assert spent_after_resume(gpus=1, restore_layers=30) <= 0.0


@pytest.mark.parametrize("aim", [0.0, 1.5, -0.2])
def test_a_budget_aim_outside_zero_to_one_is_a_typed_error_when_the_policy_is_built(aim: float) -> None:
    with pytest.raises(BudgetError, match="aim"):
        build_controller("ours", PolicySetting(budget_aim=aim))


def test_the_pool_is_sized_by_the_capacity_its_workers_report_not_the_configured_one() -> None:
    """A worker measures its own K: where the workers hold two sessions each, eight active need four of them."""
    snapshot = ClusterSnapshot()
    for index in range(4):
        snapshot.upsert_gpu(GpuView(f"g{index}", "h100", 2, 0.0))
    for index in range(8):
        snapshot.upsert_session(SessionView(f"s{index}", 3 * GB, True, f"g{index % 4}"))
    controller = build_controller("ours", PolicySetting(burst_coverage=0.0))  # configured K: 4
    assert controller.decide(snapshot, 0.0).target_gpus == 5  # ceil(8 / 2) and the warm spare
    configured = steady_cluster(active=8, gpus=4)
    assert build_controller("ours", PolicySetting(burst_coverage=0.0)).decide(configured, 0.0).target_gpus == 3


def test_the_typical_capacity_is_the_median_the_gpus_of_a_kind_report_as_they_change() -> None:
    snapshot = ClusterSnapshot()
    assert snapshot.typical_capacity("h100") is None
    for gpu_id, capacity in (("a", 4), ("b", 3), ("c", 3)):
        snapshot.upsert_gpu(GpuView(gpu_id, "h100", capacity, 0.0))
    snapshot.upsert_gpu(GpuView("other", "a100", 8, 0.0))
    assert snapshot.typical_capacity("h100") == 3 and snapshot.typical_capacity("a100") == 8
    snapshot.upsert_gpu(GpuView("b", "h100", 4, 0.0))  # b measured again
    assert snapshot.typical_capacity("h100") == 4
    snapshot.remove_gpu("a")
    snapshot.remove_gpu("b")
    assert snapshot.typical_capacity("h100") == 3


def test_recent_rises_are_measured_once_their_horizon_has_passed_and_forgotten_after_the_window() -> None:
    rises = RecentRises(horizon_s=10.0, window_s=100.0, step_s=5.0)
    rises.record(0.0, 0)
    rises.record(5.0, 4)
    rises.record(10.0, 4)
    assert len(rises) == 0 and rises.quantile(0.9) == 0  # no horizon has passed yet
    rises.record(11.0, 4)
    assert len(rises) == 1 and rises.quantile(0.5) == 4  # the rise from 0 s: 0 -> 4
    rises.record(200.0, 0)
    assert len(rises) == 2 and rises.quantile(0.99) == 0  # two flat rises closed; the one of 4 forgotten
    with pytest.raises(BurstMemoryError):
        RecentRises(horizon_s=0.0, window_s=100.0)


def test_the_recent_rise_sizing_covers_a_quantile_of_the_rises_seen_and_a_prior_before_it_has_any() -> None:
    sizing = RecentRiseHeadroom(30.0, 10.0, 1, 64, quantile=0.9, window_s=1800.0)
    count, reason = sizing.target_gpus(reading(16, 0.0), 4)
    assert count == 7 and "prior" in reason  # ceil((16 + 3 sqrt(16)) / 4)
    for now_s in range(5, 600, 5):  # ten steady minutes: every rise is nothing
        sizing.target_gpus(reading(16, float(now_s)), 4)
    assert sizing.target_gpus(reading(16, 600.0), 4)[0] == 5  # the sessions' 4 GPUs and the warm spare
    for now_s in range(605, 1200, 5):  # then a clump of 8 for 5 s at the top of every minute
        sizing.target_gpus(reading(24 if now_s % 60 == 0 else 16, float(now_s)), 4)
    assert sizing.target_gpus(reading(16, 1200.0), 4)[0] == 6  # room for 16 + 8
    for now_s in range(1205, 3200, 5):  # a calm half hour and more: the clumps leave the window
        sizing.target_gpus(reading(16, float(now_s)), 4)
    assert sizing.target_gpus(reading(16, 3200.0), 4)[0] == 5
    with pytest.raises(AutoscaleError):
        RecentRiseHeadroom(30.0, 10.0, 1, 64, quantile=1.0, window_s=1800.0)


def test_ours_recent_rises_is_ours_with_the_candidate_sizing_and_its_settings() -> None:
    controller = build_controller("ours_recent_rises", PolicySetting(recent_rise_quantile=0.8))
    assert isinstance(controller.autoscale, RecentRiseHeadroom)
    assert controller.autoscale.quantile == 0.8 and controller.autoscale.rises.window_s == 1800.0
    assert controller.config.overflow_slots == build_controller("ours", PolicySetting()).config.overflow_slots
