"""The scheduler's typed settings, read from the environment once at start."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import CommonSettings, ConfigError, env_float


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    """Where the scheduler connects and how quickly it gives up on a silent worker."""

    nats_url: str
    """NATS server URL (NATS_URL)."""
    database_url: str
    """PostgreSQL URL with the psycopg driver (DATABASE_URL); the schema is migrated to head at start."""
    worker_timeout_s: float = 3.0
    """A worker not heard from for this long is lost and its sessions move (TURBOSERVE_WORKER_TIMEOUT_S, 0.1-300)."""
    sweep_interval_s: float = 0.1
    """How often worker liveness is checked and late workers probed (TURBOSERVE_SCHED_SWEEP_S, 0.01-60): it bounds
    how soon a killed worker is found; cheap, as only late workers are probed. The control loop retries unplaced
    sessions every control period."""
    linger_s: float = 60.0
    """A session whose gateway stopped renewing its lease is closed this long after the lease ran out, unless a
    client resumed it through another gateway (TURBOSERVE_LINGER_S, the gateway's linger, 0-3600)."""
    offload_after_s: float = 10.0
    """The control loop offloads an idle session whose row has not changed for this long (TURBOSERVE_OFFLOAD_AFTER_S,
    0.1-86400)."""

    def __post_init__(self) -> None:
        if self.sweep_interval_s > self.worker_timeout_s:
            raise ConfigError(
                f"sweep interval {self.sweep_interval_s} s exceeds the worker timeout {self.worker_timeout_s} s: "
                "a lost worker would be noticed late"
            )

    @classmethod
    def from_env(cls) -> SchedulerSettings:
        common = CommonSettings.from_env()
        return cls(
            nats_url=common.nats_url,
            database_url=common.database_url,
            worker_timeout_s=env_float("TURBOSERVE_WORKER_TIMEOUT_S", 3.0, low=0.1, high=300.0),
            sweep_interval_s=env_float("TURBOSERVE_SCHED_SWEEP_S", 0.1, low=0.01, high=60.0),
            offload_after_s=env_float("TURBOSERVE_OFFLOAD_AFTER_S", 10.0, low=0.1, high=86400.0),
            linger_s=env_float("TURBOSERVE_LINGER_S", 60.0, low=0.0, high=3600.0),
        )
