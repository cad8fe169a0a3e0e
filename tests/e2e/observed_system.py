"""The whole system as separate processes with tracing on (exporting to a test OTLP receiver) and a metrics
endpoint per service, for the observability tests. Each service picks a free metrics port and logs it; this
reads the port back from the log."""

from __future__ import annotations

import os
import re
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from services.common.telemetry.tracing import otlp_export_env
from services.launcher import Child
from tests.e2e.conftest import RunningSystem, running_system

_METRICS_LINE = re.compile(r"event=metrics_listening service=\S+ host=\S+ port=(\d+)")


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass
class ObservedSystem(RunningSystem):
    metrics_ports: dict[str, int]

    def scrape(self, child_name: str) -> list[Sample]:
        url = f"http://127.0.0.1:{self.metrics_ports[child_name]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return [
            Sample(s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text) for s in family.samples
        ]


def tracing_env(otlp_endpoint: str) -> dict[str, str]:
    """Tracing on, exporting every 100 ms so a test sees its spans quickly."""
    return {**otlp_export_env(otlp_endpoint), "OTEL_BSP_SCHEDULE_DELAY": "100", "TURBOSERVE_TRACE_CHUNK_RATIO": "1"}


def _metrics_port(child: Child, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = _METRICS_LINE.search(child.log_path.read_text(errors="replace"))
        if found:
            return int(found.group(1))
        if child.process.poll() is not None:
            raise RuntimeError(f"{child.name} exited with code {child.process.returncode}; see {child.log_path}")
        time.sleep(0.05)
    raise RuntimeError(f"{child.name} logged no metrics port within {timeout_s} s; see {child.log_path}")


@contextmanager
def observed_system(nats_url: str, database_url: str, otlp_endpoint: str) -> Iterator[ObservedSystem]:
    """Scheduler, state store, one worker and the gateway, traced and with /metrics; stopped on exit."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    settings = {"TURBOSERVE_METRICS_PORT": "0", "TURBOSERVE_METRICS_HOST": "127.0.0.1", **tracing_env(otlp_endpoint)}
    with running_system(nats_url, database_url, workers=1, settings=settings, inherited=inherited) as running:
        ports = {child.name: _metrics_port(child, timeout_s=30) for child in running.children}
        yield ObservedSystem(**vars(running), metrics_ports=ports)
