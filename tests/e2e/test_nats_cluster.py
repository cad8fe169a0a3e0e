"""The system on a real 3-node NATS cluster (loopback, JetStream with every snapshot bucket replicated 3 times):
a node killed with -9 mid-stream loses no session and no chunk; every service fails over to the other nodes."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator

import pytest

from services.client import TurboServeClient
from services.common.nats_server import NatsServer, start_nats_cluster
from tests.e2e.conftest import (
    TOKENS,
    RunningSystem,
    receive,
    running_system,
    start_when_workers_registered,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[NatsServer]]:
    servers = start_nats_cluster(3)
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def clustered(cluster: list[NatsServer], database_url: str) -> Iterator[RunningSystem]:
    urls = ",".join(server.url for server in cluster)
    with running_system(urls, database_url, workers=2, settings={"TURBOSERVE_SNAPSHOT_REPLICAS": "3"}) as running:
        yield running


async def test_a_nats_node_killed_mid_stream_loses_no_session_and_no_chunk(
    clustered: RunningSystem, cluster: list[NatsServer],
) -> None:
    clients = [await TurboServeClient.connect(clustered.ws_url, TOKENS[i % 2]) for i in range(4)]
    try:
        sessions = [str((await start_when_workers_registered(c, f"clustered {i}", i))["session_id"])
                    for i, c in enumerate(clients)]
        before = await asyncio.gather(*(receive(c, s, 3) for c, s in zip(clients, sessions, strict=True)))
        os.kill(cluster[0].process.pid, signal.SIGKILL)
        after = await asyncio.gather(*(receive(c, s, 5) for c, s in zip(clients, sessions, strict=True)))
        for session_id, first, rest in zip(sessions, before, after, strict=True):
            seqs = [chunk.header.seq for chunk in first + rest]
            assert seqs == list(range(8)), f"{session_id}: gap, duplicate or reorder across the node kill: {seqs}"
        for client, session_id in zip(clients, sessions, strict=True):
            await client.close_session(session_id)  # a worker that was on the dead node may look lost
    finally:
        for client in clients:
            await client.close()
