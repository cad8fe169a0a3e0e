"""The whole system as separate processes (scheduler, state store, two workers, gateway) on a real nats-server
and a real PostgreSQL database, started once per module."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.common.nats_server import free_port
from services.launcher import Child, start_services, stop_children, wait_http_ok

TOKENS = ("token-alpha", "token-beta")


@dataclass
class RunningSystem:
    ws_url: str
    http_url: str
    database_url: str
    nats_url: str
    children: list[Child]
    env: dict[str, str]

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def logs(self) -> str:
        return "\n".join(f"--- {c.name}\n{c.log_path.read_text(errors='replace')[-3000:]}" for c in self.children)


@pytest.fixture(scope="module")
def system(nats_url: str, database_url: str) -> Iterator[RunningSystem]:
    port = free_port()
    log_dir = Path(tempfile.mkdtemp(prefix="turboserve-e2e-"))
    env = {
        **os.environ, "NATS_URL": nats_url, "DATABASE_URL": database_url, "TURBOSERVE_MODEL": "tiny",
        "TURBOSERVE_TOKENS": ",".join(TOKENS), "TURBOSERVE_GATEWAY_PORT": str(port),
        "TURBOSERVE_HEARTBEAT_S": "0.25", "TURBOSERVE_WORKER_TIMEOUT_S": "1.5",
        "TURBOSERVE_STATE_DIR": str(log_dir / "state"), "PYTHONUNBUFFERED": "1",
    }
    children = start_services(env, workers=2, log_dir=log_dir)
    running = RunningSystem(
        ws_url=f"ws://127.0.0.1:{port}/ws", http_url=f"http://127.0.0.1:{port}", database_url=database_url,
        nats_url=nats_url, children=children, env=env,
    )
    try:
        wait_http_ok(f"{running.http_url}/healthz", children, timeout_s=90)
        yield running
    except BaseException:
        print(running.logs())
        raise
    finally:
        stop_children(children)
        shutil.rmtree(log_dir, ignore_errors=True)
