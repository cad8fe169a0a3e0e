"""The metric recorders and the fleet gauge: the named series move as the services record events."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from services.common.config import ConfigError
from services.common.telemetry.fleet import FleetGauges
from services.common.telemetry.metrics import (
    metrics_port,
    record_migration,
    record_scale_event,
    record_state_bytes,
    set_sessions,
    worker_series,
)


def sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_a_chunk_records_latency_by_worker_and_model_and_its_queue_wait() -> None:
    before = sample("turboserve_chunk_latency_seconds_count", worker="unit-w", model="tiny")
    series = worker_series("unit-w", "tiny")
    assert worker_series("unit-w", "tiny") is series, "label children are looked up once"
    series.observe_batch(3)
    series.observe_chunk(queue_wait_s=0.01, latency_s=0.2)
    assert sample("turboserve_chunk_latency_seconds_count", worker="unit-w", model="tiny") == before + 1
    assert sample("turboserve_chunk_latency_seconds_bucket", worker="unit-w", model="tiny", le="0.2") >= 1
    assert sample("turboserve_batch_size_sum", worker="unit-w") >= 3
    assert sample("turboserve_queue_wait_seconds_count", worker="unit-w") >= 1


def test_session_states_are_all_set_even_those_not_reported() -> None:
    set_sessions("unit-w", {"active": 2, "idle": 1})
    assert [sample("turboserve_sessions", worker="unit-w", state=s) for s in ("active", "idle", "offloaded")] == [
        2, 1, 0,
    ]


def test_state_bytes_migrations_and_scale_events_count_up() -> None:
    offloaded = sample("turboserve_state_bytes_total", direction="offload")
    record_state_bytes("offload", 4096)
    assert sample("turboserve_state_bytes_total", direction="offload") == offloaded + 4096
    paused = sample("turboserve_migration_pause_seconds_count")
    record_migration("copied", 0.025)
    record_migration("aborted", 0.0)
    assert sample("turboserve_migrations_total", outcome="copied") >= 1
    assert sample("turboserve_migration_pause_seconds_count") == paused + 1, "only completed moves have a pause"
    outs = sample("turboserve_scale_events_total", direction="out")
    record_scale_event("out", 2)
    assert sample("turboserve_scale_events_total", direction="out") == outs + 2


def test_the_metrics_port_is_optional_and_bounded() -> None:
    assert metrics_port({}) is None and metrics_port({"TURBOSERVE_METRICS_PORT": ""}) is None
    assert metrics_port({"TURBOSERVE_METRICS_PORT": "0"}) == 0
    assert metrics_port({"TURBOSERVE_METRICS_PORT": "9100"}) == 9100
    with pytest.raises(ConfigError, match="TURBOSERVE_METRICS_PORT='x'"):
        metrics_port({"TURBOSERVE_METRICS_PORT": "x"})
    with pytest.raises(ConfigError, match="out of bounds"):
        metrics_port({"TURBOSERVE_METRICS_PORT": "70000"})


def test_a_worker_counts_as_live_until_its_heartbeats_stop_for_the_timeout_or_it_says_goodbye() -> None:
    now_s = 100.0
    gauges = FleetGauges(worker_timeout_s=1.5, clock=lambda: now_s)
    gauges.heartbeat("a")
    gauges.heartbeat("b")
    assert gauges.live_workers() == 2
    now_s = 101.0
    gauges.heartbeat("a")
    gauges.gone("b")
    assert gauges.live_workers() == 1
    now_s = 102.6
    assert gauges.live_workers() == 0
