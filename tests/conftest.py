"""Real servers for the integration tiers: one nats-server per test session (JetStream in a temp dir, free port)
and a fresh PostgreSQL database per test session (the local server, DATABASE_URL, or an embedded one)."""

from __future__ import annotations

import os

# One intra-op thread for torch here and in every process the tests start: the CI machine has 2 cores, and
# oversubscribed torch threads make the model many times slower, not faster.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from services.common.nats_server import NatsServer, start_nats_server
from services.common.postgres_server import locate_postgres


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    server = start_nats_server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A database of its own for this test session on whichever server is found, dropped at the end."""
    handle = locate_postgres()
    admin_url = handle.url
    name = f"turboserve_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, query = admin_url.partition("?")
    test_url = base.rsplit("/", 1)[0] + f"/{name}" + (f"?{query}" if query else "")
    yield test_url
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    handle.stop()
