"""The event-level simulator: cost, latency accounting, waits, restores and provisioning delay."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from services.scheduler.policy.registry import CHOSEN, PolicySetting, build_controller
from services.scheduler.sim.cli import add_simulate_parser, run_simulate
from services.scheduler.sim.engine import GPU_USES, LATE_CAUSES, SimConfig, Simulator
from services.scheduler.sim.results import SimResult
from services.scheduler.sim.scenario import Scenario, run_scenario
from services.scheduler.sim.synthetic import SyntheticSpec, generate
from services.scheduler.sim.trace import SessionTrace, Trace, lower_bound_gpu_hours

STATE = 3_500_000_000


def simulate(trace: Trace, policy: str, fixed_gpus: int = 1, delay_s: float = 30.0) -> SimResult:
    setting = PolicySetting(provisioning_delay_s=delay_s, fixed_gpus=fixed_gpus)
    truth = setting.models()
    config = SimConfig(provisioning_delay_s=delay_s)
    return Simulator(trace, build_controller(policy, setting), config, truth.latency, truth.migration,
                     truth.restore).run()


def test_a_fixed_pool_costs_its_size_times_the_window_and_chunks_run_at_the_model_latency() -> None:
    sessions = tuple(SessionTrace(f"s{i}", ((0.0, 3600.0),), 3600.0, STATE) for i in range(4))
    result = simulate(Trace("t", sessions, 0.0, 3600.0), "fixed", fixed_gpus=2)
    assert result.gpu_hours == pytest.approx(2.0)
    assert result.total_chunks == pytest.approx(4 * 3600.0 / 0.75)
    assert result.worst_latency_ms == pytest.approx(180.0 + 55.0 + 18.0 / 4)
    assert result.over_target_frac == 0.0


def test_a_fixed_pool_bills_the_lower_bounds_need_as_serving_and_the_rest_as_headroom() -> None:
    sessions = tuple(SessionTrace(f"s{i}", ((0.0, 3600.0),), 3600.0, STATE) for i in range(5))
    result = simulate(Trace("t", sessions, 0.0, 3600.0), "fixed", fixed_gpus=3)
    assert set(result.gpu_hours_by_use) == set(GPU_USES)
    assert result.gpu_hours_by_use["serving"] == pytest.approx(2.0)  # ceil(5 / 4) GPUs all hour
    assert result.gpu_hours_by_use["headroom"] == pytest.approx(1.0)
    assert result.gpu_hours_by_use["provisioning"] == result.gpu_hours_by_use["held"] == 0.0


def test_an_autoscaled_pool_bills_its_delay_as_provisioning_and_its_scale_in_hold_as_held() -> None:
    busy = tuple(SessionTrace(f"s{i}", ((100.0, 400.0),), 400.0, STATE) for i in range(8))
    trace = Trace("t", (*busy, SessionTrace("stays", ((100.0, 900.0),), 900.0, STATE)), 0.0, 900.0)
    result = simulate(trace, "paper", delay_s=30.0)
    uses = result.gpu_hours_by_use
    assert sum(uses.values()) == pytest.approx(result.gpu_hours)
    assert uses["provisioning"] == pytest.approx(result.counters["gpus_added"] * 30.0 / 3600.0)
    assert uses["serving"] < lower_bound_gpu_hours(trace, 4, 1)  # 9 sessions on 1 GPU while 2 more provisioned
    assert 0.0 < uses["held"] < 2 * 60.0 / 3600.0  # after 400 s, until the paper's 5 s hold and its drains end


def test_sessions_beyond_capacity_wait_and_their_waiting_shows_in_chunk_latency() -> None:
    sessions = tuple(SessionTrace(f"s{i}", ((0.0, 600.0),), 600.0, STATE) for i in range(4))
    late = SessionTrace("late", ((10.0, 600.0),), 600.0, STATE)
    result = simulate(Trace("t", (*sessions, late), 0.0, 600.0), "fixed", fixed_gpus=1)
    assert result.worst_latency_ms == pytest.approx(590_000.0, rel=0.01)
    assert result.over_target_frac > 0.15


def test_each_chunk_over_target_is_put_down_to_a_wait_or_to_a_batch_past_capacity() -> None:
    sessions = tuple(SessionTrace(f"s{i}", ((0.0, 600.0),), 600.0, STATE) for i in range(4))
    trace = Trace("t", (*sessions, SessionTrace("fifth", ((10.0, 600.0),), 600.0, STATE)), 0.0, 600.0)
    waits = simulate(trace, "fixed", fixed_gpus=1)  # the fifth waits for a slot the whole window
    overflows = simulate(trace, "ours_no_autoscale", fixed_gpus=1)  # after a wait it takes an overflow slot
    wait_s = CHOSEN["ours"]["overflow_after_s"]
    for result in (waits, overflows):
        assert sum(result.over_target_by_cause().values()) == pytest.approx(result.over_target_frac)
        assert result.over_target_by_cause()["restore"] == result.over_target_by_cause()["migration"] == 0.0
    assert waits.over_target_by_cause()["over_capacity"] == 0.0 and waits.over_target_frac > 0.15
    assert waits.first_chunk_quantile_s(1.0) > 500.0
    assert overflows.over_target_by_cause()["waiting"] < 0.002  # the chunks it owed while it waited
    # the GPU runs four in one forward and the fifth after it: one chunk in five is late, and still real time
    assert 0.18 < overflows.over_target_by_cause()["over_capacity"] <= 0.2
    assert overflows.over_interval_frac < 0.002  # only the owed chunks of its wait stall the player
    # no deadline yet, so the worker runs the newcomer's first chunk in the first forward: the wait + l(4)
    assert overflows.first_chunk_quantile_s(1.0) == pytest.approx(wait_s + 0.363, abs=0.001)


def test_autoscaling_waits_out_the_provisioning_delay_before_placing() -> None:
    sessions = tuple(SessionTrace(f"s{i}", ((100.0, 700.0),), 700.0, STATE) for i in range(8))
    result = simulate(Trace("t", sessions, 0.0, 700.0), "paper", delay_s=30.0)
    assert result.worst_latency_ms == pytest.approx(30_000.0 + 363.0, rel=0.01)
    assert result.counters["scale_out_events"] >= 1


def test_a_resume_pays_what_its_first_pass_does_not_hide_of_the_restore_on_its_first_chunk() -> None:
    session = SessionTrace("s", ((0.0, 60.0), (100.0, 160.0)), 200.0, STATE)
    result = simulate(Trace("t", (session,), 0.0, 200.0), "fixed", fixed_gpus=1)
    assert result.counters["restores"] == 1 and result.counters["offloads"] == 2
    chunk_ms = 180.0 + 18.0 / 16
    hidden_ms = 0.15 * chunk_ms * 29 / 30
    assert result.worst_latency_ms == pytest.approx(chunk_ms + STATE / 55e6 - hidden_ms, rel=1e-3)


def test_ours_keeps_synthetic_bursty_load_within_target_for_less_than_a_peak_sized_pool() -> None:
    trace = generate(SyntheticSpec(duration_s=2 * 3600.0, mean_active=32.0, burst_factor=2.0, seed=11))
    peak_gpus = -(-trace.peak_active() // 4)
    ours = run_scenario(trace, Scenario("ours", 30.0))
    fixed = run_scenario(trace, Scenario("fixed", 30.0, fixed_gpus=peak_gpus))
    assert ours.over_target_frac < 0.002
    assert ours.gpu_hours < fixed.gpu_hours
    assert sum(ours.over_target_by_cause().values()) == pytest.approx(ours.over_target_frac)


def test_the_simulate_command_prints_a_table_and_writes_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    add_simulate_parser(parser.add_subparsers())
    out = tmp_path / "rows.json"
    args = parser.parse_args(["simulate", "--trace", "synthetic", "--load", "4", "--policy", "ours",
                              "--policy", "fixed_peak", "--json", str(out), "--plot", str(tmp_path / "t.png")])
    assert run_simulate(args) == 0
    rows = json.loads(out.read_text())
    assert [r["policy"] for r in rows] == ["ours", "fixed_peak"]
    assert rows[0]["gpu_hours"] < rows[1]["gpu_hours"]
    for row in rows:  # the splits by cause and by use ride along in the JSON and add up to their totals
        causes = [row[f"over_target_frac_{cause}"] for cause in LATE_CAUSES]
        assert sum(causes) == pytest.approx(row["over_target_frac"])
        assert sum(row[f"gpu_hours_{use}"] for use in GPU_USES) == pytest.approx(row["gpu_hours"], abs=0.003)
    assert (tmp_path / "t.png").stat().st_size > 0
    assert "lower bound" in capsys.readouterr().out


def test_the_simulate_command_says_clearly_when_traces_are_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TURBOSERVE_TRACES", str(tmp_path / "nowhere"))
    parser = argparse.ArgumentParser()
    add_simulate_parser(parser.add_subparsers())
    assert run_simulate(parser.parse_args(["simulate", "--trace", "mooncake"])) == 2
    assert "TURBOSERVE_TRACES" in capsys.readouterr().out
