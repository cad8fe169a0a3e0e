"""`turboserve up`: NATS, PostgreSQL and every service as supervised child processes, stopped together on
Ctrl-C; ``start_services`` starts the same services unsupervised (the end-to-end tests and benchmarks own them).

Children get PR_SET_PDEATHSIG and TURBOSERVE_SUPERVISOR_PID, so even a `kill -9` of this process leaves no
orphan; temp dirs (NATS JetStream, embedded Postgres, logs) are removed on exit, except the logs of services
that crashed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
from rich.console import Console

from services.common.nats_server import NatsServer, start_nats_server
from services.common.postgres_server import PostgresHandle, locate_postgres
from services.common.processes import end_with_parent, process_alive
from services.common.service import SUPERVISOR_PID_ENV
from services.supervisor import Program, Supervisor, become_subreaper

console = Console()

@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path


def spawn(name: str, command: str, env: dict[str, str], log_dir: Path, *, die_with_parent: bool = True) -> Child:
    """``turboserve <command>`` logging to ``<log_dir>/<name>.log``; by default it gets SIGTERM when its parent
    dies (a worker under a supervisor does not: it outlives a scheduler crash, see provisioners/local.py)."""
    log_path = log_dir / f"{name}.log"
    return Child(name, start_service(command, env, log_path, die_with_parent=die_with_parent), log_path)


def start_service(
    command: str, env: dict[str, str], log_path: Path, *, die_with_parent: bool = True
) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "services.cli", command], env=env, stdout=log_file, stderr=subprocess.STDOUT,
            preexec_fn=end_with_parent if die_with_parent else None,
        )


def instance_database(handle: PostgresHandle) -> tuple[str, str | None]:
    """The URL to use, and the database this instance created for itself on a shared local server (dropped when
    it stops): two ``up``s on one host never share sessions or workers. A ``DATABASE_URL`` is used as given."""
    if handle.source != "local":
        return handle.url, None
    name = f"turboserve_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(handle.url, autocommit=True) as conn:
        for (stale,) in conn.execute("select datname from pg_database where datname ~ '^turboserve_[0-9]+_'"):
            if not process_alive(int(stale.split("_")[1])):  # left by an instance killed with -9
                conn.execute(f'drop database if exists "{stale}" with (force)')
        conn.execute(f'create database "{name}"')
    return handle.url.rsplit("/", 1)[0] + f"/{name}", name


def drop_database(handle: PostgresHandle, name: str) -> None:
    with contextlib.suppress(psycopg.Error), psycopg.connect(handle.url, autocommit=True) as conn:
        conn.execute(f'drop database if exists "{name}" with (force)')


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


def restart_service(
    children: list[Child], name: str, env: dict[str, str], log_dir: Path, more_gateway_ports: Sequence[int] = ()
) -> Child:
    """Start a service of ``start_services`` again after a crash, as a supervisor would: same name, settings and
    log file (and gateway-N on its own port); it replaces the dead one in ``children``."""
    old = next(c for c in children if c.name == name)
    command = "state-store" if name == "state-store" else name.split("-")[0]
    extra = {"TURBOSERVE_WORKER_ID": name} if command == "worker" else {}
    if command == "gateway" and name != "gateway":
        extra["TURBOSERVE_GATEWAY_PORT"] = str(more_gateway_ports[int(name.split("-")[1]) - 2])
    fresh = spawn(name, command, {**env, **extra}, log_dir)
    children[children.index(old)] = fresh
    return fresh


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


def supervised_programs(env: dict[str, str], *, workers: int) -> list[Program]:
    """What ``up`` keeps running: scheduler, state store, workers unless the scheduler's local provisioner starts
    them (then they belong to no single scheduler process, see provisioners/local.py), and the gateway."""
    def program(name: str, command: str, extra: dict[str, str] | None = None) -> Program:
        return Program(name, lambda log_path: start_service(command, {**env, **(extra or {})}, log_path))

    programs = [program("scheduler", "scheduler"), program("state-store", "state-store")]
    if env.get("TURBOSERVE_PROVISIONER") != "local":
        programs += [program(f"worker-{i}", "worker", {"TURBOSERVE_WORKER_ID": f"worker-{i}"})
                     for i in range(1, workers + 1)]
    return [*programs, program("gateway", "gateway")]


def wait_until(ready: Callable[[], bool], supervisor: Supervisor, what: str, timeout_s: float) -> None:
    """Poll ``ready`` while the supervisor restarts what crashes; a service that refuses its settings ends it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for event in supervisor.check():
            console.print(f"[yellow]{event}[/]")
        if supervisor.failed:
            name, code, log_path = supervisor.failed[0]
            raise RuntimeError(f"{name} exited with code {code}: {log_path.read_text(errors='replace')[-600:]}")
        if ready():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} within {timeout_s:g} s")


def http_ok(url: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=0.5) as response:
        return bool(response.status == 200)
    return False


def workers_heard(database_url: str, count: int) -> bool:
    query = "select count(*) from workers where status = 'live' and last_seen > now() - interval '3 seconds'"
    with contextlib.suppress(psycopg.Error), psycopg.connect(database_url, connect_timeout=2) as conn:
        row = conn.execute(query).fetchone()
        return row is not None and row[0] >= count
    return False


def run_up(*, workers: int, model: str, port: int) -> int:
    """Everything of one instance under a supervisor until Ctrl-C: a crashed service is restarted (its log
    kept), and the instance has a database of its own, so two ``up``s on one host never meet."""
    log_dir = Path(tempfile.mkdtemp(prefix="turboserve-logs-"))
    weights_dir = log_dir / "synthetic-weights"
    nats: NatsServer | None = None
    postgres: PostgresHandle | None = None
    database: str | None = None
    supervisor = Supervisor(log_dir)
    stop_requested = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    become_subreaper()
    try:
        with console.status("starting NATS and PostgreSQL"):
            nats_url = os.environ.get("NATS_URL")
            if nats_url is None:
                nats = start_nats_server()
                nats_url = nats.url
            postgres = locate_postgres()
            database_url, database = instance_database(postgres)
        with console.status("reading the model directory"):
            model_dir = model_directory(model, weights_dir)
        first_entry = os.environ.get("TURBOSERVE_TOKENS", "").split(",")[0]
        token = first_entry.partition("=")[2] if "=" in first_entry else first_entry
        token = token or secrets.token_urlsafe(16)
        env = {
            **os.environ, "NATS_URL": nats_url, "DATABASE_URL": database_url, "TURBOSERVE_MODEL": model,
            "TURBOSERVE_MODEL_DIR": str(model_dir), "TURBOSERVE_TOKENS": os.environ.get("TURBOSERVE_TOKENS", token),
            "TURBOSERVE_GATEWAY_PORT": str(port), SUPERVISOR_PID_ENV: str(os.getpid()),
            "PYTHONUNBUFFERED": "1", "TURBOSERVE_PROVISIONER": os.environ.get("TURBOSERVE_PROVISIONER", "local"),
            "TURBOSERVE_LOCAL_WORKERS": str(workers), "TURBOSERVE_LOG_DIR": str(log_dir),
        }
        with console.status("starting scheduler, state store, workers and gateway"):
            for program in supervised_programs(env, workers=workers):
                supervisor.add(program)
            wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), supervisor,
                       f"the gateway did not answer on port {port}", 60)
            wait_until(lambda: workers_heard(database_url, workers), supervisor,
                       f"{workers} workers did not register with the scheduler", 120)
        weights = "synthetic weights" if model_dir == weights_dir else str(model_dir)
        console.print(f"[bold green]TurboServe is up[/] ({workers} workers, model {model}, {weights})")
        console.print(f"  viewer:   [link]http://127.0.0.1:{port}/?token={token}[/link]")
        console.print(f"  token:    {token}")
        console.print(f"  NATS:     {nats_url}   PostgreSQL: {postgres.source}"
                      + (f" (database {database}, this instance's own)" if database else ""))
        console.print(f"  logs:     {log_dir}")
        console.print("  A service that crashes is restarted; Ctrl-C stops everything.")
        while not stop_requested:
            for event in supervisor.check():
                console.print(f"[yellow]{event}[/]")
            if supervisor.failed:
                name, code, log_path = supervisor.failed[0]
                console.print(f"[red]{name} cannot run (exit code {code})[/]; last lines of {log_path}:")
                console.print(log_path.read_text(errors="replace")[-2000:])
                return 1
            if nats is not None and nats.process.poll() is not None:
                console.print("[yellow]NATS exited; restarting it on the same port and JetStream data[/] "
                              "(the services reconnect)")
                nats = nats.restart_after_crash()
            time.sleep(0.2)
        return 0
    except RuntimeError as exc:
        console.print(f"[red]turboserve up failed:[/] {exc}")
        return 1
    finally:
        with console.status("stopping"):
            supervisor.stop()
            if nats is not None:
                nats.stop()
            if postgres is not None:
                if database is not None:
                    drop_database(postgres, database)
                postgres.stop()
        if supervisor.crash_logs:
            console.print(f"logs of crashed services kept in {log_dir}: "
                          + ", ".join(path.name for path in supervisor.crash_logs))
        else:
            shutil.rmtree(log_dir, ignore_errors=True)
        console.print("stopped; no processes left behind")
