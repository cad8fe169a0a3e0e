"""Real servers for the integration tiers: one nats-server per test session (JetStream in a temp dir, free port)
and a fresh PostgreSQL database per test session (the local server, DATABASE_URL, or an embedded one)."""

from __future__ import annotations

import os

# One intra-op thread for torch here and in every process the tests start: the CI machine has 2 cores, and
# oversubscribed torch threads make the model many times slower, not faster.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from collections.abc import Iterator

import pytest

from services.common.nats_server import NatsServer, start_nats_server
from services.common.postgres_server import locate_postgres, scratch_database


@pytest.fixture
def one_intra_op_thread() -> Iterator[None]:
    """For tests of tiny tensors: OpenMP fan-out only adds barrier waits (30x slower on a loaded 2-core box), and
    OMP_NUM_THREADS above is only a default a developer's environment may override."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
    try:
        with scratch_database(handle.url, "turboserve_test") as url:
            yield url
    finally:
        handle.stop()
