"""The forecast reference: the rise of the active count over a horizon, its quantile over replications, and ours'
controller sized by it."""

from __future__ import annotations

import pytest

from services.scheduler.policy.autoscale import AutoscaleError
from services.scheduler.policy.detector import DEFAULT_LEVELS, WorkloadReading
from services.scheduler.sim.forecast import (
    ForecastError,
    ForecastHeadroom,
    active_counts,
    forecast_rises,
    rises,
)
from services.scheduler.sim.scenario import Scenario, run_scenario
from services.scheduler.sim.trace import SessionTrace, Trace

STATE = 4_000_000_000


def clump(at_s: float, sessions: int, window_end_s: float = 600.0) -> Trace:
    """``sessions`` arrivals one second apart from ``at_s``, each active for 200 s."""
    return Trace("clump", tuple(SessionTrace(f"s{i}", ((at_s + i, at_s + 200.0),), at_s + 200.0, STATE)
                                for i in range(sessions)), 0.0, window_end_s)


def reading(active: int, now_s: float) -> WorkloadReading:
    return WorkloadReading(DEFAULT_LEVELS[0], active, 0.0, 0.0, 0.0, now_s=now_s)


def test_the_rise_is_the_highest_count_within_the_horizon_less_the_count_now() -> None:
    counts = active_counts(clump(100.0, 8), 0, 400)
    assert list(counts[99:109]) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 8]
    assert counts[299] == 8 and counts[300] == 0
    rise = rises(counts, 40)
    assert rise[59] == 0 and rise[60] == 1 and rise[67] == 8  # the clump comes into view a second at a time
    assert rise[104] == 3 and rise[150] == 0 and rise[300] == 0  # a fall is no rise


def test_the_forecast_is_a_quantile_of_the_replications_rises_before_they_come() -> None:
    told = forecast_rises([clump(100.0, 8), clump(100.0, 8), clump(300.0, 4)], 40.0, (0.5, 0.9), pool_s=0)
    assert told[0.9].rise_at(80.0) == told[0.5].rise_at(80.0) == 8.0  # two of three replications rise by 8
    assert told[0.9].rise_at(280.0) == 4.0 and told[0.5].rise_at(280.0) == 0.0  # one of three: only the tail
    assert told[0.9].rise_at(-1e9) == 0.0 and told[0.9].rise_at(1e9) == 0.0  # outside: the nearest second's
    pooled = forecast_rises([clump(300.0, 4)], 40.0, (0.99,), pool_s=30)[0.99]
    assert pooled.rise_at(235.0) == 4.0  # a rise within 30 s counts towards the moment's quantile


def test_a_forecast_that_cannot_be_made_is_refused_with_a_typed_error() -> None:
    with pytest.raises(ForecastError, match="at least one replication"):
        forecast_rises([], 40.0, (0.9,))
    with pytest.raises(ForecastError, match="quantiles in"):
        forecast_rises([clump(100.0, 2)], 40.0, (1.0,))
    with pytest.raises(ForecastError, match="horizon_s > 0"):
        forecast_rises([clump(100.0, 2)], 0.0, (0.9,))
    with pytest.raises(AutoscaleError):
        ForecastHeadroom(forecast_rises([clump(100.0, 2)], 40.0, (0.9,))[0.9], 2, 1)


def test_the_forecast_sizes_room_for_the_active_sessions_and_the_rise_and_keeps_a_spare() -> None:
    sizing = ForecastHeadroom(forecast_rises([clump(100.0, 8)], 40.0, (0.9,), pool_s=0)[0.9], 1, 64)
    assert sizing.target_gpus(reading(2, 80.0), 4)[0] == 3  # ceil((2 + 8) / 4)
    assert sizing.target_gpus(reading(2, 500.0), 4)[0] == 2  # no rise: ceil(2 / 4) and the warm spare
    assert sizing.target_gpus(reading(0, 500.0), 4)[0] == 1


def test_ours_sized_by_a_forecast_has_the_gpus_ready_for_a_clump_that_ours_could_not_foresee() -> None:
    trace = clump(300.0, 16)
    told = forecast_rises([trace], 40.0, (0.9,), pool_s=0)[0.9]
    scenario = Scenario("ours", 30.0)
    forecast = run_scenario(trace, scenario, autoscale=ForecastHeadroom(told, 1, 4096, 1))
    ours = run_scenario(trace, scenario)
    assert forecast.over_target_frac == 0.0
    assert forecast.first_chunk_quantile_s(1.0) < 1.0
    assert ours.over_target_frac > 0.0  # a first clump of 16 lands on one warm GPU and its overflow slots
    assert ours.first_chunk_quantile_s(1.0) > forecast.first_chunk_quantile_s(1.0)
