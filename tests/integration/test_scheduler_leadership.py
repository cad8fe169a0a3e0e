"""One decider among several schedulers, on real PostgreSQL and NATS: the lead is a PostgreSQL advisory lock held
on a connection, a standby serves nothing until it holds it, and a leader that lost its connection takes the lead
back only if nobody else did."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import nats
import psycopg
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from prometheus_client import REGISTRY

from services.common.config import libpq_url
from services.common.errors import Unavailable
from services.scheduler.leadership import Leadership, LeadershipLost
from services.scheduler.runner import run_scheduler
from services.scheduler.settings import SchedulerSettings
from tests.integration.test_scheduler_postgres import scheduler_database_url
from tests.integration.test_scheduler_runner import eventually

pytestmark = pytest.mark.integration
__all__ = ["scheduler_database_url"]

POLL_S = 0.05


def terminate_the_leaders_connection(database_url: str) -> int:
    """What PostgreSQL does to a holder whose host vanished, or what a restart does: its backend ends."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as bystander:
        rows = bystander.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())").fetchall()
    return len(rows)


@contextlib.asynccontextmanager
async def claims(database_url: str, count: int) -> AsyncIterator[list[Leadership]]:
    leaderships = [Leadership(database_url, poll_s=POLL_S, timeout_s=2.0) for _ in range(count)]
    try:
        yield leaderships
    finally:
        for leadership in leaderships:
            await leadership.close()


async def test_a_standby_takes_the_lead_as_soon_as_the_leader_gives_it_up(scheduler_database_url: str) -> None:
    async with claims(scheduler_database_url, 2) as (first, second):
        stop = asyncio.Event()
        assert await first.acquire(stop)
        assert REGISTRY.get_sample_value("turboserve_scheduler_leading") == 1
        standby = asyncio.create_task(second.acquire(stop))
        await asyncio.sleep(10 * POLL_S)
        assert not standby.done()  # one decider
        await first.close()
        assert REGISTRY.get_sample_value("turboserve_scheduler_leading") == 0
        assert await asyncio.wait_for(standby, timeout=5.0)
        await second.confirm()
        stop.set()
        assert not await first.acquire(stop)  # a stopped standby gives up waiting


async def test_a_leader_that_lost_its_connection_takes_the_lead_back_only_if_nobody_else_did(
    scheduler_database_url: str,
) -> None:
    async with claims(scheduler_database_url, 2) as (leader, other):
        stop = asyncio.Event()
        assert await leader.acquire(stop)
        assert terminate_the_leaders_connection(scheduler_database_url) == 1
        await leader.confirm()  # nobody else asked: it leads again, on a new connection
        assert not leader.lost.is_set()
        assert terminate_the_leaders_connection(scheduler_database_url) == 1
        assert await asyncio.wait_for(other.acquire(stop), timeout=5.0)  # the standby got in first
        with pytest.raises(LeadershipLost):
            await leader.confirm()
        assert leader.lost.is_set()
        with pytest.raises(LeadershipLost):  # deposed for good: it never decides again
            await leader.confirm()


async def test_a_leader_that_cannot_reach_postgresql_is_unavailable_not_deposed() -> None:
    leadership = Leadership("postgresql://nobody@127.0.0.1:1/none", poll_s=POLL_S, timeout_s=1.0)
    with pytest.raises(Unavailable) as raised:
        await leadership.confirm()
    assert not isinstance(raised.value, LeadershipLost) and not leadership.lost.is_set()
    await leadership.close()


async def responders(nc: NatsClient, service: str, wait_s: float = 0.3) -> list[str]:
    """The ids of the instances of a micro service that answer a discovery ping."""
    inbox = nc.new_inbox()
    heard: list[str] = []

    async def hear(msg: Msg) -> None:
        heard.append(json.loads(msg.data)["id"])

    subscription = await nc.subscribe(inbox, cb=hear)
    await nc.publish(f"$SRV.PING.{service}", b"", reply=inbox)
    await asyncio.sleep(wait_s)
    await subscription.unsubscribe()
    return heard


async def test_of_two_schedulers_one_serves_and_the_other_serves_once_it_stops(
    scheduler_database_url: str, nats_url: str,
) -> None:
    settings = SchedulerSettings(nats_url=nats_url, database_url=scheduler_database_url, sweep_interval_s=0.05)
    clients = [await nats.connect(nats_url) for _ in range(3)]
    stops = [asyncio.Event(), asyncio.Event()]
    first = asyncio.create_task(run_scheduler(settings, clients[0], stops[0]))
    served = await eventually(lambda: responders(clients[2], "turboserve_scheduler"), timeout_s=30.0)
    second = asyncio.create_task(run_scheduler(settings, clients[1], stops[1]))
    try:
        await asyncio.sleep(1.0)
        assert await responders(clients[2], "turboserve_scheduler") == served and not second.done()
        stops[0].set()
        await asyncio.wait_for(first, timeout=15.0)
        taken_over = await eventually(lambda: responders(clients[2], "turboserve_scheduler"), timeout_s=15.0)
        assert len(taken_over) == 1 and taken_over != served
    finally:
        for stop in stops:
            stop.set()
        await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), timeout=15.0)
        for client in clients:
            await client.close()
