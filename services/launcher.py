"""`turboserve up`: NATS, PostgreSQL and every service as child processes, stopped together on Ctrl-C.

Children get PR_SET_PDEATHSIG, so even a `kill -9` of this process leaves no orphan; temp dirs (NATS JetStream,
embedded Postgres, logs) are removed on exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
from rich.console import Console

from services.common.nats_server import NatsServer, start_nats_server
from services.common.postgres_server import PostgresHandle, locate_postgres

console = Console()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path


def spawn(name: str, command: str, env: dict[str, str], log_dir: Path) -> Child:
    log_path = log_dir / f"{name}.log"
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", command], env=env, stdout=log_file, stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent,
    )
    log_file.close()
    return Child(name, process, log_path)


def own_database(handle: PostgresHandle, name: str = "turboserve") -> str:
    """On the shared local server use a database of our own, created on first use."""
    if handle.source != "local":
        return handle.url
    with psycopg.connect(handle.url, autocommit=True) as conn:
        exists = conn.execute("select 1 from pg_database where datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'create database "{name}"')
    return handle.url.rsplit("/", 1)[0] + f"/{name}"


def start_services(
    env: dict[str, str], *, workers: int, log_dir: Path, more_gateway_ports: Sequence[int] = ()
) -> list[Child]:
    """Scheduler, state store, workers (ids worker-1..N) and gateway, in the order they depend on each other;
    ``more_gateway_ports``: further gateways (gateway-2, ...) beside the first, any of which serves any session.
    With TURBOSERVE_PROVISIONER=local the scheduler starts the N workers itself, so it can also stop them."""
    if env.get("TURBOSERVE_PROVISIONER") == "local":
        env = {**env, "TURBOSERVE_LOCAL_WORKERS": str(workers), "TURBOSERVE_LOG_DIR": str(log_dir)}
        workers = 0
    children = [spawn("scheduler", "scheduler", env, log_dir), spawn("state-store", "state-store", env, log_dir)]
    for index in range(1, workers + 1):
        children.append(spawn(f"worker-{index}", "worker", {**env, "TURBOSERVE_WORKER_ID": f"worker-{index}"}, log_dir))
    children.append(spawn("gateway", "gateway", env, log_dir))
    for index, port in enumerate(more_gateway_ports, start=2):
        children.append(spawn(f"gateway-{index}", "gateway", {**env, "TURBOSERVE_GATEWAY_PORT": str(port)}, log_dir))
    return children


def wait_http_ok(url: str, children: list[Child], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in children:
            if child.process.poll() is not None:
                raise RuntimeError(f"{child.name} exited with code {child.process.returncode}; see {child.log_path}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=0.5) as response:
                if response.status == 200:
                    return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


def wait_workers_heard(database_url: str, count: int, children: list[Child], timeout_s: float) -> None:
    """Until the scheduler has recorded ``count`` workers heart-beating just now: only then can a session start."""
    deadline = time.monotonic() + timeout_s
    query = "select count(*) from workers where status = 'live' and last_seen > now() - interval '3 seconds'"
    while time.monotonic() < deadline:
        for child in children:
            if child.process.poll() is not None:
                raise RuntimeError(f"{child.name} exited with code {child.process.returncode}; see {child.log_path}")
        with contextlib.suppress(psycopg.Error), psycopg.connect(database_url, connect_timeout=2) as conn:
            row = conn.execute(query).fetchone()
            if row is not None and row[0] >= count:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{count} workers did not register with the scheduler within {timeout_s} s")


def stop_children(children: list[Child], timeout_s: float = 10.0) -> None:
    for child in reversed(children):  # gateway first, scheduler last
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in children:
        remaining = max(0.1, deadline - time.monotonic())
        try:
            child.process.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()


def model_directory(model: str, scratch: Path) -> Path:
    """``TURBOSERVE_MODEL_DIR`` when set; for ``tiny`` without one, synthetic weights written to ``scratch``."""
    configured = os.environ.get("TURBOSERVE_MODEL_DIR")
    if configured:
        return Path(configured)
    if model != "tiny":
        raise RuntimeError(f"model {model!r} needs its published files: set TURBOSERVE_MODEL_DIR "
                           "(README: which files go where)")
    from services.gpu_worker.model.config import get_config
    from services.gpu_worker.model.synth import write_synthetic_dir

    return write_synthetic_dir(get_config(model), scratch)


def run_up(*, workers: int, model: str, port: int) -> int:
    log_dir = Path(tempfile.mkdtemp(prefix="turboserve-logs-"))
    weights_dir = log_dir / "synthetic-weights"
    nats: NatsServer | None = None
    postgres: PostgresHandle | None = None
    children: list[Child] = []
    stop_requested = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        with console.status("starting NATS and PostgreSQL"):
            nats_url = os.environ.get("NATS_URL")
            if nats_url is None:
                nats = start_nats_server()
                nats_url = nats.url
            postgres = locate_postgres()
            database_url = own_database(postgres)
        with console.status("reading the model directory"):
            model_dir = model_directory(model, weights_dir)
        first_entry = os.environ.get("TURBOSERVE_TOKENS", "").split(",")[0]
        token = first_entry.partition("=")[2] if "=" in first_entry else first_entry
        token = token or secrets.token_urlsafe(16)
        env = {
            **os.environ, "NATS_URL": nats_url, "DATABASE_URL": database_url, "TURBOSERVE_MODEL": model,
            "TURBOSERVE_MODEL_DIR": str(model_dir), "TURBOSERVE_TOKENS": os.environ.get("TURBOSERVE_TOKENS", token),
            "TURBOSERVE_GATEWAY_PORT": str(port),
            "PYTHONUNBUFFERED": "1", "TURBOSERVE_PROVISIONER": os.environ.get("TURBOSERVE_PROVISIONER", "local"),
        }
        with console.status("starting scheduler, state store, workers and gateway"):
            children.extend(start_services(env, workers=workers, log_dir=log_dir))
            wait_http_ok(f"http://127.0.0.1:{port}/healthz", children, timeout_s=60)
            wait_workers_heard(database_url, workers, children, timeout_s=120)
        weights = "synthetic weights" if model_dir == weights_dir else str(model_dir)
        console.print(f"[bold green]TurboServe is up[/] ({workers} workers, model {model}, {weights})")
        console.print(f"  viewer:   [link]http://127.0.0.1:{port}/?token={token}[/link]")
        console.print(f"  token:    {token}")
        console.print(f"  NATS:     {nats_url}   PostgreSQL: {postgres.source}")
        console.print(f"  logs:     {log_dir}")
        console.print("  Ctrl-C stops everything.")
        while not stop_requested:
            dead = [c for c in children if c.process.poll() is not None]
            if dead:
                console.print(f"[red]{dead[0].name} exited with code {dead[0].process.returncode}[/]; "
                              f"last lines of {dead[0].log_path}:")
                console.print(dead[0].log_path.read_text(errors="replace")[-2000:])
                return 1
            time.sleep(0.2)
        return 0
    except RuntimeError as exc:
        console.print(f"[red]turboserve up failed:[/] {exc}")
        return 1
    finally:
        with console.status("stopping"):
            stop_children(children)
            if nats is not None:
                nats.stop()
            if postgres is not None:
                postgres.stop()
        shutil.rmtree(log_dir, ignore_errors=True)
        console.print("stopped; no processes or temp dirs left behind")
