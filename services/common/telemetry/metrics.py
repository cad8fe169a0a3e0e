"""Every Prometheus series TurboServe exposes, in one place, and the ``/metrics`` endpoint each service serves.

The names and labels are a contract with ``infra/prometheus/prometheus.yml`` and the Grafana dashboard
(``infra/grafana/dashboards/turboserve.json``): change them together. A service exposes only the series it
updates; the families are registered process-wide, so a series nobody touches is simply absent or zero.
The endpoint runs on its own thread (prometheus_client's server), so a scrape never waits on the event loop.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from services.common.config import ConfigError

log = logging.getLogger("turboserve.telemetry")

METRICS_PORT_ENV = "TURBOSERVE_METRICS_PORT"
METRICS_HOST_ENV = "TURBOSERVE_METRICS_HOST"

CHUNK_LATENCY = Histogram(
    "turboserve_chunk_latency_seconds",
    "Per-chunk latency on a worker: from the chunk being ready (credit in hand) to its frame published.",
    ["worker", "model"],
    buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0),
)
BATCH_SIZE = Histogram(
    "turboserve_batch_size", "Sessions coalesced into one batched forward.", ["worker"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
)
QUEUE_WAIT = Histogram(
    "turboserve_queue_wait_seconds", "Time a ready chunk waited for a batch to start.", ["worker"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)
SESSIONS = Gauge(
    "turboserve_sessions",
    "Sessions a worker holds: active (credited), idle (resident, no credit), offloaded (state in host memory).",
    ["worker", "state"],
)
WORKERS = Gauge("turboserve_workers", "Workers the scheduler considers live.")
LEADING = Gauge("turboserve_scheduler_leading", "1 on the scheduler that decides, 0 on one standing by.")
MIGRATIONS = Counter("turboserve_migrations", "Session migrations reported to the scheduler, by outcome.", ["outcome"])
MIGRATION_PAUSE = Histogram(
    "turboserve_migration_pause_seconds", "How long a migrated session was paused (stop-and-copy).",
    buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0),
)
STATE_BYTES = Counter(
    "turboserve_state_bytes", "Session state bytes moved between the device and host memory.", ["direction"]
)
SCALE_EVENTS = Counter("turboserve_scale_events", "Scaling decisions by direction.", ["direction"])
WEBSOCKET_CONNECTIONS = Gauge("turboserve_websocket_connections", "Open client WebSocket connections.")

SessionState = Literal["active", "idle", "offloaded"]
StateDirection = Literal["offload", "restore"]


@dataclass(frozen=True, slots=True)
class WorkerSeries:
    """One worker's label-bound children, looked up once, so recording a chunk costs no label hashing."""

    chunk_latency: Histogram
    batch_size: Histogram
    queue_wait: Histogram

    def observe_batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def observe_chunk(self, queue_wait_s: float, latency_s: float) -> None:
        self.queue_wait.observe(queue_wait_s)
        self.chunk_latency.observe(latency_s)


@functools.cache
def worker_series(worker_id: str, model: str) -> WorkerSeries:
    return WorkerSeries(
        CHUNK_LATENCY.labels(worker=worker_id, model=model), BATCH_SIZE.labels(worker=worker_id),
        QUEUE_WAIT.labels(worker=worker_id),
    )


def set_sessions(worker_id: str, counts: Mapping[SessionState, int]) -> None:
    for state in ("active", "idle", "offloaded"):
        SESSIONS.labels(worker=worker_id, state=state).set(counts.get(state, 0))


def record_state_bytes(direction: StateDirection, state_bytes: int) -> None:
    STATE_BYTES.labels(direction=direction).inc(state_bytes)


def record_migration(outcome: str, pause_s: float) -> None:
    MIGRATIONS.labels(outcome=outcome).inc()
    if outcome == "copied":
        MIGRATION_PAUSE.observe(pause_s)


def record_scale_event(direction: Literal["out", "in"], count: int = 1) -> None:
    SCALE_EVENTS.labels(direction=direction).inc(count)


def metrics_port(environ: Mapping[str, str] = os.environ) -> int | None:
    """TURBOSERVE_METRICS_PORT: unset or empty serves nothing (several services share a host in
    ``turboserve up``); 0 picks a free port, logged at start."""
    raw = environ.get(METRICS_PORT_ENV, "").strip()
    if not raw:
        return None
    try:
        port = int(raw)
    except ValueError:
        raise ConfigError(f"{METRICS_PORT_ENV}={raw!r} is not an integer") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{METRICS_PORT_ENV}={port} is out of bounds [0, 65535]")
    return port


@contextlib.contextmanager
def metrics_endpoint(service: str, environ: Mapping[str, str] = os.environ) -> Iterator[int | None]:
    """Serve ``/metrics`` while the block runs; yields the bound port, or None when no port is configured."""
    port = metrics_port(environ)
    if port is None:
        yield None
        return
    host = environ.get(METRICS_HOST_ENV, "0.0.0.0")
    server, thread = start_http_server(port, addr=host)
    bound = int(server.server_address[1])
    log.info("event=metrics_listening service=%s host=%s port=%d", service, host, bound)
    try:
        yield bound
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
