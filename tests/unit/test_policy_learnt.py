"""What the controller hands on across a scheduler restart (``learnt``/``relearn``): the burst memory and the
violation budget, as plain JSON data, taken back so that the sizing decides as it would have without the restart,
and refused whole when it cannot be read."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest

from services.scheduler.policy.autoscale import AnticipatoryHeadroom
from services.scheduler.policy.budget import ViolationBudget
from services.scheduler.policy.controller import LearntStateError
from services.scheduler.policy.detector import DEFAULT_LEVELS, WorkloadDetector, WorkloadReading
from services.scheduler.policy.registry import PolicySetting, build_controller


def a_day(seed: int, steps: int) -> list[tuple[float, int]]:
    """(time, active) every 2 s: a drifting load with clumps, and a lull that ends in one."""
    rng = random.Random(seed)
    active, day = 6, []
    for step in range(steps):
        if step % 400 in range(150, 200):
            active = 0  # a lull
        elif step % 400 == 200:
            active = rng.randint(8, 14)  # the clump that ends it
        else:
            active = max(0, active + rng.choice((-1, 0, 0, 1)) + (rng.randint(3, 9) if rng.random() < 0.01 else 0))
        day.append((2.0 * step, active))
    return day


def through_json(state: dict[str, Any]) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(json.dumps(state, allow_nan=False))
    return decoded


def sizing() -> AnticipatoryHeadroom:
    return AnticipatoryHeadroom(30.0, 10.0, 1, 64, burst_coverage=0.6)


def test_a_sizing_restarted_from_what_it_learnt_decides_as_it_would_have_without_the_restart() -> None:
    day = a_day(seed=3, steps=2400)
    kept, restarted = sizing(), sizing()
    half = len(day) // 2
    for now_s, active in day[:half]:
        reading = WorkloadReading(DEFAULT_LEVELS[0], active, 0.0, 0.0, 0.0, now_s=now_s)
        kept.target_gpus(reading, 4)
        restarted.target_gpus(reading, 4)
    state = through_json(restarted.learnt(day[half - 1][0]))
    restarted = sizing()
    restarted.relearn(state, at_s=day[half - 1][0] - 7_000.0)  # the new process's clock starts elsewhere
    shift_s = -7_000.0
    clumps = 0
    for now_s, active in day[half:]:
        before = WorkloadReading(DEFAULT_LEVELS[0], active, 0.0, 0.0, 0.0, now_s=now_s)
        after = WorkloadReading(DEFAULT_LEVELS[0], active, 0.0, 0.0, 0.0, now_s=now_s + shift_s)
        assert restarted.target_gpus(after, 4)[0] == kept.target_gpus(before, 4)[0]
        assert restarted.bursts.rise_z(active) == pytest.approx(kept.bursts.rise_z(active), rel=1e-9)
        clumps += kept.bursts.clump_room() > 0
    assert clumps > 0  # the lulls' room was carried over, not only the histograms


def test_the_time_a_scheduler_was_away_is_forgotten_as_the_memory_forgets() -> None:
    memory_owner = sizing()
    for now_s, active in a_day(seed=5, steps=1200):
        memory_owner.target_gpus(WorkloadReading(DEFAULT_LEVELS[0], active, 0.0, 0.0, 0.0, now_s=now_s), 4)
    state = through_json(memory_owner.learnt(2400.0))
    back = sizing()
    back.relearn(state, at_s=0.0)
    _, weight_then_s = back.bursts._all.tail(0.0)
    _, weight_s = back.bursts._all.tail(back.bursts.params.window_s)  # away for one window of the memory
    assert weight_then_s > 0 and weight_s == pytest.approx(weight_then_s / math.e, rel=1e-9)


def test_the_controller_hands_on_its_budget_and_sizing_and_refuses_a_state_it_cannot_read_whole() -> None:
    controller = build_controller("ours", PolicySetting())
    controller.budget.record(0.0, 10, 2)
    controller.budget.record(600.0, 10, 0)
    for now_s, active in a_day(seed=1, steps=600):
        controller.autoscale.target_gpus(WorkloadReading(DEFAULT_LEVELS[0], active, 0.0, 0.0, 0.0, now_s=now_s), 4)
    state = through_json(controller.learnt(1200.0))

    fresh = build_controller("ours", PolicySetting())
    fresh.relearn(state, at_s=50.0)
    assert fresh.budget.spent_frac == pytest.approx(controller.budget.spent_frac)
    assert isinstance(fresh.autoscale, AnticipatoryHeadroom) and isinstance(controller.autoscale, AnticipatoryHeadroom)
    assert fresh.autoscale.bursts.overall_z == pytest.approx(controller.autoscale.bursts.overall_z)

    untouched = build_controller("ours", PolicySetting())
    budget, bursts = untouched.budget, untouched.autoscale.bursts  # type: ignore[attr-defined]
    broken_bins = json.loads(json.dumps(state))
    broken_bins["autoscale"]["all"]["bins"] = [1.0, 2.0]
    broken_budget = {**state, "budget": {**state["budget"], "active_s": -1.0}}
    ahead = {**state, "detector": {"window": [[10.0, 3, 0]], "recent": []}}  # counters past the last sample's
    unordered = {**state, "detector": {"window": [[1.0, -2, 0], [5.0, 0, 0]], "recent": []}}
    detector = untouched.detector
    for bad in ({**state, "version": 99}, [1, 2], broken_bins, broken_budget, {**state, "budget": "full"},
                {"version": state["version"]}, ahead, unordered, {**state, "detector": {"window": []}}):
        with pytest.raises(LearntStateError):
            untouched.relearn(bad, at_s=0.0)
        assert untouched.budget is budget and untouched.autoscale.bursts is bursts  # type: ignore[attr-defined]
        assert untouched.detector is detector


def test_a_detector_taken_back_reads_the_load_as_the_uninterrupted_one_on_a_new_clock_and_new_counters() -> None:
    rng = random.Random(5)
    inflow = outflow = 0
    timeline = []
    for step in range(400):
        inflow += rng.choice((0, 0, 1, 1, 2, 6 if step % 97 == 0 else 0))
        outflow += rng.choice((0, 1, 1))
        timeline.append((2.0 * step, inflow, outflow))
    kept, before = WorkloadDetector(), WorkloadDetector()
    for now_s, arrived, left in timeline[:250]:
        kept.update(now_s, 10, arrived, left)
        before.update(now_s, 10, arrived, left)
    kept_s = timeline[249][0]
    shift_s, base_in, base_out = -9_000.0, 7 - timeline[249][1], 3 - timeline[249][2]  # a successor's own counters
    after, fresh = WorkloadDetector(), WorkloadDetector()
    after.relearn(through_json(before.learnt(kept_s)), at_s=kept_s + shift_s)
    readings = []
    for now_s, arrived, left in timeline[249:]:  # the successor first sees the counters as they were kept
        expected = kept.update(now_s, 10, arrived, left) if now_s > kept_s else None
        read = after.update(now_s + shift_s, 10, arrived + base_in, left + base_out)
        unaware = fresh.update(now_s, 10, arrived, left)
        if expected is not None:
            readings.append((expected, read, unaware))
    for expected, read, _ in readings:
        assert (read.level, read.inflow_per_s, read.outflow_per_s, read.volatility) == pytest.approx(
            (expected.level, expected.inflow_per_s, expected.outflow_per_s, expected.volatility))
    assert any(unaware.inflow_per_s != pytest.approx(expected.inflow_per_s) for expected, _, unaware in readings)


def test_a_budget_taken_back_steers_the_headroom_as_before() -> None:
    budget = ViolationBudget()
    for second in range(0, 7200, 10):
        budget.record(float(second), 40, 1 if second % 600 == 0 else 0)
    back = ViolationBudget.from_learnt(budget.params, through_json(budget.learnt(7200.0)), at_s=100.0)
    budget.record(7300.0, 40, 0)
    back.record(200.0, 40, 0)
    assert back.headroom_scale() == pytest.approx(budget.headroom_scale())
    assert back.spent_frac == pytest.approx(budget.spent_frac)


def test_a_memory_whose_clock_starts_below_zero_keeps_the_room_after_a_lull() -> None:
    memory = AnticipatoryHeadroom(30.0, 10.0, 1, 64).bursts  # the simulator's warm-up runs at negative times
    for now_s, active in [(-600.0 + 2.0 * step, 9 if 20 <= step < 60 else 0) for step in range(150)]:
        memory.record(now_s, active)
    assert memory.clump_room() == 9
