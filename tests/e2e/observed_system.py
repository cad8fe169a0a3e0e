"""The whole system as separate processes with tracing on (exporting to a test OTLP receiver) and a metrics
endpoint per service, for the observability tests. Kept out of conftest so the plain ``system`` fixture is
untouched; each service picks a free metrics port and logs it, and this reads the port back from the log."""

from __future__ import annotations

import os
import re
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from services.common.nats_server import free_port
from services.launcher import Child, start_services, stop_children, wait_http_ok
from tests.e2e.conftest import TOKENS, RunningSystem

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
    """What turns tracing on for every service, in the standard variables Jaeger deployments use."""
    return {
        "TURBOSERVE_TRACING": "1", "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


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
    port = free_port()
    log_dir = Path(tempfile.mkdtemp(prefix="turboserve-observed-"))
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env = {
        **inherited, "NATS_URL": nats_url, "DATABASE_URL": database_url, "TURBOSERVE_MODEL": "tiny",
        "TURBOSERVE_TOKENS": ",".join(TOKENS), "TURBOSERVE_GATEWAY_PORT": str(port),
        "TURBOSERVE_HEARTBEAT_S": "0.25", "TURBOSERVE_WORKER_TIMEOUT_S": "1.5",
        "TURBOSERVE_STATE_DIR": str(log_dir / "state"), "PYTHONUNBUFFERED": "1",
        "TURBOSERVE_METRICS_PORT": "0", "TURBOSERVE_METRICS_HOST": "127.0.0.1", **tracing_env(otlp_endpoint),
    }
    children = start_services(env, workers=1, log_dir=log_dir)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/healthz", children, timeout_s=90)
        running = ObservedSystem(
            ws_url=f"ws://127.0.0.1:{port}/ws", http_url=f"http://127.0.0.1:{port}", database_url=database_url,
            nats_url=nats_url, children=children, env=env,
            metrics_ports={child.name: _metrics_port(child, timeout_s=30) for child in children},
        )
        try:
            yield running
        except BaseException:
            print(running.logs())
            raise
    finally:
        stop_children(children)
