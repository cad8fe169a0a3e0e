"""Every request endpoint runs on one skeleton: whatever its handler does, the caller gets one answer, at once."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NatsClient

from services.common.endpoints import Endpoint, serve
from services.common.errors import InvalidState
from services.common.messages import Reply
from services.common.snapshots import DescribeStore, SnapshotQuery
from services.common.wire import Message, decode, encode

pytestmark = pytest.mark.integration
log = logging.getLogger("tests.endpoints")


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NatsClient]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


async def _handle(query: SnapshotQuery) -> Message:
    if query.session_id == "bug":
        raise KeyError("a bug of ours")
    if query.session_id == "busy":
        raise InvalidState("session busy is paused")
    return Reply(ok=True, detail=query.session_id)


async def _ask(nc: NatsClient, subject: str, payload: bytes) -> Reply:
    started = time.monotonic()
    answer = decode((await nc.request(subject, payload, timeout=5.0)).data)
    assert time.monotonic() - started < 2.0, "answered only after the caller's timeout"
    assert isinstance(answer, Reply)
    return answer


async def test_every_outcome_of_a_handler_is_one_prompt_answer_with_a_documented_code(
    nc: NatsClient, caplog: pytest.LogCaptureFixture,
) -> None:
    subject = "test.endpoints.query"
    service = await serve(nc, service="probe", description="test", queue_group="probe", log=log,
                          endpoints=[Endpoint.typed("query", subject, SnapshotQuery, _handle)])
    try:
        assert await _ask(nc, subject, encode(SnapshotQuery(session_id="s1"))) == Reply(ok=True, detail="s1")
        refused = await _ask(nc, subject, encode(SnapshotQuery(session_id="busy")))
        assert (refused.ok, refused.code) == (False, "invalid_state")
        with caplog.at_level(logging.INFO, logger="tests.endpoints"):
            failed = await _ask(nc, subject, encode(SnapshotQuery(session_id="bug")))
        assert (failed.ok, failed.code) == (False, "internal")
        assert len([r for r in caplog.records if r.exc_info]) == 1, "a bug is logged once, with its traceback"
        assert (await _ask(nc, subject, encode(DescribeStore()))).code == "unknown_type"
        assert (await _ask(nc, subject, b"\xc1 not msgpack")).code == "malformed"
        stats = json.loads((await nc.request("$SRV.STATS.turboserve_probe", b"", timeout=5.0)).data)
        assert stats["endpoints"][0]["num_requests"] == 5 and stats["endpoints"][0]["subject"] == subject
    finally:
        await service.stop()


async def test_a_waiting_request_holds_up_only_its_own_session(nc: NatsClient) -> None:
    """A handler that waits (an attach waiting for the batch in flight) must not delay other sessions' requests,
    while one session's requests are still handled in the order they came."""
    subject = "test.endpoints.ordered"
    release = asyncio.Event()
    handled: list[str] = []

    async def handle(query: SnapshotQuery) -> Message:
        if query.session_id == "slow" and not handled:
            handled.append("slow-1 started")
            await release.wait()
        handled.append(query.session_id)
        return Reply(ok=True, detail=query.session_id)

    service = await serve(nc, service="probe", description="test", queue_group="probe", log=log,
                          endpoints=[Endpoint.typed("query", subject, SnapshotQuery, handle)])
    try:
        first_slow = asyncio.create_task(nc.request(subject, encode(SnapshotQuery(session_id="slow")), timeout=5.0))
        await asyncio.sleep(0.05)
        second_slow = asyncio.create_task(nc.request(subject, encode(SnapshotQuery(session_id="slow")), timeout=5.0))
        await asyncio.sleep(0.05)
        other = await _ask(nc, subject, encode(SnapshotQuery(session_id="other")))
        assert other.detail == "other"
        assert handled == ["slow-1 started", "other"], "the slow session's second request waits for its first"
        release.set()
        await asyncio.gather(first_slow, second_slow)
        assert handled == ["slow-1 started", "other", "slow", "slow"]
    finally:
        await service.stop()
