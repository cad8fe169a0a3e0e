"""The real servers the integration tiers use come up and answer."""

from __future__ import annotations

import signal

import nats
import psycopg
import pytest

from services.common.nats_server import start_nats_server

pytestmark = pytest.mark.integration


async def test_the_nats_server_fixture_answers_requests(nats_url: str) -> None:
    client = await nats.connect(nats_url)
    async def pong(msg: nats.aio.msg.Msg) -> None:
        await msg.respond(b"pong")

    sub = await client.subscribe("ping", cb=pong)
    reply = await client.request("ping", b"", timeout=2)
    assert reply.data == b"pong"
    await sub.unsubscribe()
    await client.close()


def test_the_database_fixture_is_a_postgres_database_of_this_test_session(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        (version,) = conn.execute("select version()").fetchone()
        (name,) = conn.execute("select current_database()").fetchone()
    assert version.startswith("PostgreSQL") and name.startswith("turboserve_test_")


async def test_a_nats_server_restarted_after_a_crash_keeps_its_jetstream_data() -> None:
    """What `up`'s supervisor does when its NATS dies: same port, same store, the snapshots still there."""
    server = start_nats_server()
    try:
        client = await nats.connect(server.url)
        bucket = await client.jetstream().create_key_value(bucket="survives")
        await bucket.put("session", b"snapshot")
        await client.close()
        server.process.send_signal(signal.SIGKILL)
        server = server.restart_after_crash()
        client = await nats.connect(server.url)
        entry = await (await client.jetstream().key_value("survives")).get("session")
        assert entry.value == b"snapshot"
        await client.close()
    finally:
        server.stop()
