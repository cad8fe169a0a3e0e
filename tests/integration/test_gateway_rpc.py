"""The gateway's requests on a real NATS server: one to the scheduler waits out a moment with nobody subscribed
(a standby taking over, a restart) within its deadline; one to a worker nobody serves fails at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from services.common import subjects
from services.common.errors import Unavailable
from services.common.messages import ListSessions, Reply, SessionList
from services.common.wire import encode
from services.gateway.rpc import request

pytestmark = pytest.mark.integration


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NatsClient]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


async def test_a_request_to_the_scheduler_is_answered_by_one_that_subscribes_within_the_deadline(
    nc: NatsClient, nats_url: str,
) -> None:
    scheduler = await nats.connect(nats_url)

    async def answer(msg: Msg) -> None:
        await msg.respond(encode(SessionList(())))

    async def take_over_later() -> None:
        await asyncio.sleep(0.4)
        await scheduler.subscribe(subjects.SCHED_LIST, cb=answer)

    try:
        taking_over = asyncio.create_task(take_over_later())
        started = time.monotonic()
        listed = await request(nc, subjects.SCHED_LIST, ListSessions("owner"), SessionList, timeout_s=5.0)
        assert listed == SessionList(()) and 0.4 <= time.monotonic() - started < 2.0
        await taking_over
    finally:
        await scheduler.close()


async def test_a_request_nobody_serves_fails_typed_at_once_for_a_worker_and_at_the_deadline_for_the_scheduler(
    nc: NatsClient,
) -> None:
    started = time.monotonic()
    with pytest.raises(Unavailable, match="nobody serves"):
        await request(nc, subjects.worker_control("gone-worker"), ListSessions("owner"), Reply, timeout_s=5.0)
    assert time.monotonic() - started < 0.5
    started = time.monotonic()
    with pytest.raises(Unavailable, match="nobody serves"):
        await request(nc, subjects.SCHED_LIST, ListSessions("owner"), SessionList, timeout_s=1.0)
    assert 0.5 < time.monotonic() - started <= 1.5
