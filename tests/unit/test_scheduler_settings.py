"""Scheduler settings come from the environment with bounds, and errors name the variable and the value."""

from __future__ import annotations

import pytest

from services.common.config import ConfigError, libpq_url
from services.scheduler.settings import SchedulerSettings


def test_settings_default_to_a_three_second_worker_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TURBOSERVE_WORKER_TIMEOUT_S", raising=False)
    monkeypatch.delenv("TURBOSERVE_SCHED_SWEEP_S", raising=False)
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@db:5432/ts")
    settings = SchedulerSettings.from_env()
    assert settings.worker_timeout_s == 3.0 and settings.sweep_interval_s == 0.1  # it bounds finding a killed worker
    assert settings.database_url == "postgresql+psycopg://u@db:5432/ts"


def test_the_worker_timeout_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURBOSERVE_WORKER_TIMEOUT_S", "1.5")
    monkeypatch.setenv("TURBOSERVE_SCHED_SWEEP_S", "0.25")
    settings = SchedulerSettings.from_env()
    assert (settings.worker_timeout_s, settings.sweep_interval_s) == (1.5, 0.25)


def test_an_out_of_bounds_timeout_is_refused_with_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURBOSERVE_WORKER_TIMEOUT_S", "0")
    with pytest.raises(ConfigError, match="TURBOSERVE_WORKER_TIMEOUT_S=0.0"):
        SchedulerSettings.from_env()


def test_a_sweep_slower_than_the_timeout_is_refused() -> None:
    with pytest.raises(ConfigError, match="exceeds the worker timeout"):
        SchedulerSettings(nats_url="nats://x", database_url="postgresql+psycopg://x/y", worker_timeout_s=1.0,
                          sweep_interval_s=2.0)


def test_the_burst_coverage_is_the_policys_own_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.scheduler.control_settings import ControlSettings, build_live_controller
    from services.scheduler.policy.registry import CHOSEN

    monkeypatch.delenv("TURBOSERVE_BURST_COVERAGE", raising=False)
    default = build_live_controller(ControlSettings.from_env()).autoscale
    assert default.burst_coverage == CHOSEN["ours"]["burst_coverage"]
    monkeypatch.setenv("TURBOSERVE_BURST_COVERAGE", "0.5")
    assert build_live_controller(ControlSettings.from_env()).autoscale.burst_coverage == 0.5
    monkeypatch.setenv("TURBOSERVE_BURST_COVERAGE", "-1")
    with pytest.raises(ConfigError, match="TURBOSERVE_BURST_COVERAGE"):
        ControlSettings.from_env()


def test_the_warm_spare_is_one_gpu_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.scheduler.control_settings import ControlSettings, build_live_controller

    monkeypatch.delenv("TURBOSERVE_SPARE_GPUS", raising=False)
    assert build_live_controller(ControlSettings.from_env()).autoscale.spare_gpus == 1
    monkeypatch.setenv("TURBOSERVE_SPARE_GPUS", "0")
    assert build_live_controller(ControlSettings.from_env()).autoscale.spare_gpus == 0
    monkeypatch.setenv("TURBOSERVE_SPARE_GPUS", "-1")
    with pytest.raises(ConfigError, match="TURBOSERVE_SPARE_GPUS"):
        ControlSettings.from_env()


def test_billing_is_to_the_instant_unless_set_and_reaches_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.scheduler.control_settings import ControlSettings, build_live_controller
    from services.scheduler.policy.billing import Billing

    for name in ("TURBOSERVE_BILLING_MINIMUM_S", "TURBOSERVE_BILLING_INCREMENT_S"):
        monkeypatch.delenv(name, raising=False)
    assert build_live_controller(ControlSettings.from_env()).config.billing == Billing()
    monkeypatch.setenv("TURBOSERVE_BILLING_MINIMUM_S", "60")
    assert build_live_controller(ControlSettings.from_env()).config.billing == Billing(60.0, 0.0)
    monkeypatch.setenv("TURBOSERVE_BILLING_INCREMENT_S", "-1")
    with pytest.raises(ConfigError, match="TURBOSERVE_BILLING_INCREMENT_S"):
        ControlSettings.from_env()


def test_the_leaders_lock_connects_by_the_same_url_without_sqlalchemys_driver_name() -> None:
    assert libpq_url("postgresql+psycopg://u@db:5432/ts") == "postgresql://u@db:5432/ts"
    assert libpq_url("postgres://u@/ts?host=/tmp/pg") == "postgresql://u@/ts?host=/tmp/pg"
    with pytest.raises(ConfigError, match="not a PostgreSQL URL"):
        libpq_url("mysql://u@db/ts")
