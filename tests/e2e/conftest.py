"""The whole system as separate processes (scheduler, state store, workers, gateway) on a real nats-server and a
real PostgreSQL database. ``running_system`` starts one with settings of a test module's choosing; the ``system``
fixture is the plain two-worker system most tests use."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import shutil
import tempfile
import time
from collections.abc import Generator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg
import pytest
from PIL import Image

from services.client import ReceivedChunk, ServerError, TurboServeClient
from services.common.nats_server import free_port
from services.launcher import Child, restart_service, start_services, stop_children, wait_http_ok
from tests.synthetic_models import tiny_model_dir

TOKENS = ("token-alpha", "token-beta")
NOTABLE = re.compile(r"decision=|event=workers?_|level=(WARNING|ERROR|CRITICAL)")
NOTABLE_LINES = 80
FAST_FAILURE_DETECTION = {"TURBOSERVE_HEARTBEAT_S": "0.25", "TURBOSERVE_WORKER_TIMEOUT_S": "1.5"}
FIXED_CAPACITY = {"TURBOSERVE_CAPACITY_FROM": "setting"}
"""K as configured, not as measured: these tests are about what clients get through placements, moves and
faults, on a CPU that another test run may share, where a measured K would move sessions on the machine's load.
tests/integration/test_worker_draining.py covers the measured K."""


@dataclass
class RunningSystem:
    ws_url: str
    http_url: str
    database_url: str
    nats_url: str
    children: list[Child]
    env: dict[str, str]
    log_dir: Path
    more_gateway_ports: list[int]
    """The ports of the gateways beside the first (gateway-2, ...)."""

    @property
    def more_ws_urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{port}/ws" for port in self.more_gateway_ports]

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def restart(self, name: str) -> Child:
        """Start a service again after a crash, as a supervisor would (same name, settings and log file)."""
        return restart_service(self.children, name, self.env, self.log_dir, self.more_gateway_ports)

    def logs(self) -> str:
        """Every service's log, workers started later by a provisioner included: its decisions, workers coming and
        going, warnings and errors from the whole run (what explains a failure usually happened early), then its
        tail (where a crash's traceback is)."""
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            text = path.read_text(errors="replace")
            notable = [line for line in text.splitlines() if NOTABLE.search(line)][-NOTABLE_LINES:]
            if notable:
                parts.append(f"--- {path.name}: notable lines\n" + "\n".join(notable))
            parts.append(f"--- {path.name}: tail\n{text[-2000:]}")
        return "\n".join(parts)


async def start_when_workers_registered(client: TurboServeClient, prompt: str, seed: int,
                                        within_s: float = 90.0) -> dict[str, object]:
    """Workers register by heartbeat once their model is loaded, a while after the gateway is up (tens of seconds
    on a machine busy with another test run); retry only that one answer."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await client.start(prompt, seed)
        except ServerError as exc:
            if exc.code != "unavailable":
                raise
            if time.monotonic() > deadline:
                raise AssertionError(f"no worker took the session within {within_s:g} s: {exc}") from exc
            await asyncio.sleep(0.1)


async def receive(client: TurboServeClient, session_id: str, count: int) -> list[ReceivedChunk]:
    return [await client.next_chunk(session_id) for _ in range(count)]


def decoded(chunks: list[ReceivedChunk]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(f))) for c in chunks for f in c.frames]).astype(np.int16)


def assert_same_frames(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Equal up to batch composition seen through JPEG: two runs of a seed batched with different company sum in
    another order, and requantisation can turn a one-level difference into a few dozen at an edge of the
    synthetic model's noisy frames. A lost cache or RNG state moves the mean by tens."""
    assert got.shape == want.shape, f"{what}: {got.shape} frames, expected {want.shape}"
    difference = np.abs(got - want)
    assert difference.mean() <= 1.0 and difference.max() <= 48, \
        f"{what} differs from an undisturbed run: mean {difference.mean():.2f}, max {difference.max()} levels"


def close_sessions_of_earlier_systems(database_url: str) -> None:
    """Modules share one database: a session an earlier module's system left open (its test failed midway)
    would count against the token's limit here, which spans every gateway of the database."""
    with contextlib.suppress(psycopg.errors.UndefinedTable), psycopg.connect(database_url) as conn:
        conn.execute("update sessions set status = 'closed', worker_id = null where status <> 'closed'")


@contextmanager
def running_system(
    nats_url: str, database_url: str, *, workers: int, settings: Mapping[str, str] = (),
    inherited: Mapping[str, str] | None = None, gateways: int = 1,
) -> Iterator[RunningSystem]:
    """Start, wait until the gateway answers, yield; print the logs if anything failed; stop and clean up."""
    port = free_port()
    log_dir = Path(tempfile.mkdtemp(prefix="turboserve-e2e-"))
    env = {
        **(os.environ if inherited is None else inherited), **FAST_FAILURE_DETECTION, **FIXED_CAPACITY,
        "NATS_URL": nats_url, "DATABASE_URL": database_url, "TURBOSERVE_MODEL": "tiny",
        "TURBOSERVE_MODEL_DIR": str(tiny_model_dir()), "TURBOSERVE_TOKENS": ",".join(TOKENS),
        "TURBOSERVE_GATEWAY_PORT": str(port),
        "TURBOSERVE_STATE_DIR": str(log_dir / "state"), "TURBOSERVE_LOG_DIR": str(log_dir), "PYTHONUNBUFFERED": "1",
        **dict(settings),
    }
    close_sessions_of_earlier_systems(database_url)
    more_ports = [free_port() for _ in range(gateways - 1)]
    children = start_services(env, workers=workers, log_dir=log_dir, more_gateway_ports=more_ports)
    running = RunningSystem(
        ws_url=f"ws://127.0.0.1:{port}/ws", http_url=f"http://127.0.0.1:{port}", database_url=database_url,
        nats_url=nats_url, children=children, env=env, log_dir=log_dir,
        more_gateway_ports=more_ports,
    )
    try:
        for http_port in (port, *more_ports):
            wait_http_ok(f"http://127.0.0.1:{http_port}/healthz", children, timeout_s=90)
        yield running
    except BaseException:
        print(running.logs())
        raise
    finally:
        stop_children(children)
        shutil.rmtree(log_dir, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test shows the logs of the system it ran against: module-scoped systems outlive the test, so
    ``running_system`` never sees its failure, and the log directory is gone once the module ends."""
    report = yield
    if report.failed and call.when == "call":
        for value in getattr(item, "funcargs", {}).values():
            for candidate in value if isinstance(value, tuple) else (value,):  # (system, its PostgreSQL), say
                if isinstance(candidate, RunningSystem):
                    report.sections.append(("turboserve services", candidate.logs()))
    return report


@pytest.fixture(scope="module")
def system(nats_url: str, database_url: str) -> Iterator[RunningSystem]:
    with running_system(nats_url, database_url, workers=2) as running:
        yield running
