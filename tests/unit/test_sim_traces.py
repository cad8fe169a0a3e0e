"""Trace conversion, scaling, windows and the offline lower bound."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.scheduler.sim.converters import ConversionAssumptions, load_mooncake, load_ragpulse
from services.scheduler.sim.synthetic import SyntheticSpec, generate
from services.scheduler.sim.trace import (
    EventKind,
    SessionTrace,
    Trace,
    TraceError,
    busiest_window,
    clairvoyant_gpu_hours,
    lower_bound_gpu_hours,
    scale_to_mean_active,
)


def write_jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    return path


def test_ragpulse_requests_become_active_periods_split_at_long_gaps(tmp_path: Path) -> None:
    records = [
        {"timestamp": "0", "output_length": 40, "session_id": "a"},
        {"timestamp": "100", "output_length": 8, "session_id": "a"},
        {"timestamp": "5000", "output_length": 4, "session_id": "a"},
        {"timestamp": "10", "output_length": 4, "session_id": "b"},
    ]
    trace = load_ragpulse(write_jsonl(tmp_path / "r.jsonl", records), ConversionAssumptions(session_split_gap_s=1800))
    by_id = {s.session_id: s for s in trace.sessions}
    assert by_id["ragpulse:a:0"].active_periods == ((0.0, 7.5), (100.0, 101.5))
    assert by_id["ragpulse:a:1"].active_periods == ((5000.0, 5000.75),)
    assert by_id["ragpulse:a:0"].departure_s == pytest.approx(101.5 + 120.0)
    assert trace.assumptions["output_tokens_per_chunk"] == 4.0


def test_mooncake_chains_follow_full_prefix_blocks(tmp_path: Path) -> None:
    records = [
        {"timestamp": 0, "input_length": 1100, "output_length": 4, "hash_ids": [0, 1, 2]},
        {"timestamp": 60000, "input_length": 2000, "output_length": 4, "hash_ids": [0, 1, 5, 6]},
        {"timestamp": 1000, "input_length": 1100, "output_length": 4, "hash_ids": [0, 9, 10]},
    ]
    trace = load_mooncake(write_jsonl(tmp_path / "m.jsonl", records))
    periods = sorted(len(s.active_periods) for s in trace.sessions)
    assert periods == [1, 2]


def test_events_are_ordered_and_a_session_arrives_active_then_departs_last() -> None:
    session = SessionTrace("x", ((0.0, 10.0), (20.0, 30.0)), 50.0, 1)
    kinds = [kind for _, kind, _ in Trace("t", (session,), 0.0, 60.0).events()]
    assert kinds == [EventKind.ARRIVE, EventKind.IDLE, EventKind.ACTIVE, EventKind.IDLE, EventKind.DEPART]


def test_overlapping_periods_are_rejected() -> None:
    with pytest.raises(TraceError):
        SessionTrace("x", ((0.0, 10.0), (5.0, 30.0)), 50.0, 1)


def test_lower_bound_integrates_ceil_of_active_over_capacity_with_a_floor() -> None:
    sessions = tuple(SessionTrace(f"s{i}", ((0.0, 1800.0),), 1800.0, 1) for i in range(5))
    trace = Trace("t", sessions, 0.0, 3600.0)
    assert lower_bound_gpu_hours(trace, 4, 1) == pytest.approx(0.5 * 2 + 0.5 * 1)
    assert lower_bound_gpu_hours(trace, 4, 3) == pytest.approx(3.0)


def test_the_clairvoyant_bound_pays_the_delay_per_start_and_bridges_gaps_shorter_than_it() -> None:
    """Level 1 is needed throughout (the floor); level 2 from 100 s to 200 s, 220 s to 300 s and 1000 s to 1100 s:
    it starts once (+30 s), bridges the 20 s gap and asks again after the long one (+30 s)."""
    periods = {"a": ((0.0, 3600.0),), "b": ((100.0, 200.0), (220.0, 300.0), (1000.0, 1100.0))}
    sessions = tuple(SessionTrace(name, p, 3600.0, 1) for name, p in periods.items())
    trace = Trace("t", sessions, 0.0, 3600.0)
    level_two_s = 100.0 + 30.0 + 20.0 + 80.0 + 100.0 + 30.0
    assert clairvoyant_gpu_hours(trace, 1, 1, 30.0) == pytest.approx((3600.0 + level_two_s) / 3600.0)
    assert lower_bound_gpu_hours(trace, 1, 1) == pytest.approx((3600.0 + 280.0) / 3600.0)
    assert clairvoyant_gpu_hours(trace, 1, 1, 0.0) == pytest.approx(lower_bound_gpu_hours(trace, 1, 1))


def test_scaling_replicates_to_about_the_requested_mean_active() -> None:
    trace = generate(SyntheticSpec(duration_s=3 * 3600.0, mean_active=4.0, seed=3))
    scaled = scale_to_mean_active(trace, 40.0, seed=1)
    assert scaled.mean_active() == pytest.approx(40.0, rel=0.15)
    assert scale_to_mean_active(trace, 40.0, seed=1).sessions == scaled.sessions


def test_busiest_window_picks_the_loaded_day() -> None:
    quiet = tuple(SessionTrace(f"q{i}", ((i * 3600.0, i * 3600.0 + 60),), i * 3600.0 + 60, 1) for i in range(24))
    busy = tuple(SessionTrace(f"b{i}", ((90000.0 + i, 90600.0),), 90600.0, 1) for i in range(50))
    trace = Trace("t", quiet + busy, 0.0, 2 * 86400.0)
    window = busiest_window(trace, 86400.0)
    assert window.window_start_s <= 90000.0 < window.window_end_s
    assert window.assumptions["busiest_window_s"] == 86400.0


def test_synthetic_bursts_raise_the_peak_without_changing_the_mean_much() -> None:
    calm = generate(SyntheticSpec(duration_s=6 * 3600.0, mean_active=32.0, burst_factor=1.0, seed=5))
    bursty = generate(SyntheticSpec(duration_s=6 * 3600.0, mean_active=32.0, burst_factor=4.0, seed=5))
    assert bursty.mean_active() == pytest.approx(calm.mean_active(), rel=0.35)
    assert bursty.peak_active() > calm.peak_active()
