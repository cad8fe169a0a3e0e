"""LatestPerKey: one piece of work per key at a time, the newest of what waited next, keys independent."""

from __future__ import annotations

import asyncio
import logging

import pytest

from services.common.latest_per_key import LatestPerKey


async def test_work_submitted_while_its_key_runs_replaces_what_waited_and_other_keys_run_meanwhile() -> None:
    ran: list[str] = []
    release = asyncio.Event()

    def work(name: str, wait: bool = False):  # type: ignore[no-untyped-def]
        async def run() -> None:
            ran.append(name)
            if wait:
                await release.wait()
        return run

    latest = LatestPerKey("test")
    latest.submit("w1", work("w1-first", wait=True))
    await asyncio.sleep(0)
    for n in range(2, 10):  # a backlog behind a slow first: only the newest is left to run
        latest.submit("w1", work(f"w1-{n}"))
    latest.submit("w2", work("w2-only"))
    await asyncio.sleep(0.01)
    assert ran == ["w1-first", "w2-only"], "another key does not wait for a slow one"
    release.set()
    async with asyncio.timeout(5.0):
        while len(ran) < 3:
            await asyncio.sleep(0.001)
    await latest.close(grace_s=1.0)
    assert ran == ["w1-first", "w2-only", "w1-9"]


async def test_a_failing_piece_is_logged_and_the_next_of_its_key_still_runs(caplog: pytest.LogCaptureFixture) -> None:
    ran: list[int] = []

    async def fail() -> None:
        raise RuntimeError("a bug")

    async def succeed() -> None:
        ran.append(1)

    latest = LatestPerKey("test")
    with caplog.at_level(logging.ERROR, logger="turboserve.latest_per_key"):
        latest.submit("k", fail)
        await asyncio.sleep(0.01)
        latest.submit("k", succeed)
        await asyncio.sleep(0.01)
    assert ran == [1] and "event=task_failed" in caplog.text
    await latest.close(grace_s=1.0)


async def test_close_drops_what_waits_and_cancels_what_outlives_its_grace() -> None:
    started, cancelled, ran_after = asyncio.Event(), asyncio.Event(), []

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def after() -> None:
        ran_after.append(True)

    latest = LatestPerKey("test")
    latest.submit("k", forever)
    await started.wait()
    latest.submit("k", after)
    async with asyncio.timeout(5.0):
        await latest.close(grace_s=0.05)
    assert cancelled.is_set() and ran_after == []
