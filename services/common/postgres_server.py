"""Find PostgreSQL: DATABASE_URL if set, else the local server on 127.0.0.1:5432 if it answers, else an embedded
one from the pgserver wheel (its own data dir, removed on stop)."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg

LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/test"


@dataclass
class PostgresHandle:
    """A URL to use and how to release what was started for it (nothing, for an existing server)."""

    url: str
    source: str  # "env" | "local" | "embedded"
    _cleanup: Callable[[], None] | None = None
    _restart: Callable[[float], None] | None = None

    @property
    def owned(self) -> bool:
        """Started by us, so ours to crash and restart (a fault in bench/chaos.py and the e2e tests)."""
        return self._restart is not None

    def crash_and_restart(self, down_s: float) -> None:
        """Stop the server the way a crash does (immediate: every connection cut, recovery on start), keep it down
        ``down_s``, then start it again on the same data, address and socket."""
        if self._restart is None:
            raise RuntimeError(f"the {self.source} PostgreSQL is not ours to restart")
        self._restart(down_s)

    def stop(self) -> None:
        if self._cleanup is not None:
            cleanup, self._cleanup = self._cleanup, None
            cleanup()


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def locate_postgres(*, allow_local: bool = True) -> PostgresHandle:
    env_url = os.environ.get("DATABASE_URL")
    if env_url:
        return PostgresHandle(url=env_url, source="env")
    if allow_local and _answers("127.0.0.1", 5432):
        return PostgresHandle(url=LOCAL_URL, source="local")
    from pgserver import get_server  # type: ignore[attr-defined]  # lazily: only a machine without a server needs it

    data_dir = tempfile.mkdtemp(prefix="turboserve-pg-")
    server = get_server(data_dir, cleanup_mode="stop")

    def cleanup() -> None:
        server.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)

    def restart(down_s: float) -> None:
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

        # postmaster.opts holds the command line the server runs with; start gets the same options back
        options = shlex.split((server.pgdata / "postmaster.opts").read_text())[1:]
        data_flag = options.index("-D")
        del options[data_flag:data_flag + 2]
        pg_ctl(["-w", "stop", "-m", "immediate"], pgdata=server.pgdata, user=server.system_user, timeout=30)
        time.sleep(down_s)
        pg_ctl(["-w", "start", "-o", shlex.join(options)], pgdata=server.pgdata, user=server.system_user, timeout=30)

    return PostgresHandle(url=server.get_uri(), source="embedded", _cleanup=cleanup, _restart=restart)


@contextlib.contextmanager
def scratch_database(server_url: str, prefix: str) -> Iterator[str]:
    """A fresh database on the server of ``server_url``, dropped afterwards, so a test session or a benchmark run
    sees only its own rows (and its scheduler only its own workers)."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, query = server_url.partition("?")
    try:
        yield base.rsplit("/", 1)[0] + f"/{name}" + (f"?{query}" if query else "")
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
