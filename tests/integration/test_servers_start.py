"""The real servers the integration tiers use come up and answer."""

from __future__ import annotations

import nats
import psycopg
import pytest

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
