"""Expiry decisions with an injected clock: closed sessions go after their retention time, staged bytes that no
head names go after the staging timeout, and nothing committed and open is ever touched."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from services.state_store.directory_store import DirectorySnapshotStore
from services.state_store.expiry import KeyedLocks, Sweeper, due_for_expiry, orphaned
from services.state_store.protocol import BlobRef, new_head


class FakeClock:
    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


async def commit(store: DirectorySnapshotStore, session_id: str, snapshot_id: str, chunk_seq: int) -> None:
    staged = await store.stage(session_id, snapshot_id, [b"state"])
    await store.commit(new_head(session_id, snapshot_id, 1, chunk_seq, {}, [b"state"], staged))


def test_sessions_expire_once_their_retention_has_passed_oldest_first() -> None:
    closed = {"young": 950.0, "old": 100.0, "exact": 900.0}
    assert due_for_expiry(closed, now_s=1000.0, retention_s=100.0) == ["old", "exact"]
    assert due_for_expiry(closed, now_s=1000.0, retention_s=1000.0) == []


def test_only_uncommitted_bytes_older_than_the_staging_timeout_are_orphans() -> None:
    blobs = [BlobRef("s", "committed", 0.0), BlobRef("s", "stale", 0.0), BlobRef("s", "uploading", 990.0)]
    blobs.append(BlobRef("gone", "x", 0.0))
    found = orphaned(blobs, {"s": "committed", "gone": None}, now_s=1000.0, staging_timeout_s=60.0)
    assert [(b.session_id, b.snapshot_id) for b in found] == [("s", "stale"), ("gone", "x")]


async def test_the_sweeper_keeps_a_closed_session_until_its_retention_ends(tmp_path: Path) -> None:
    store = DirectorySnapshotStore(tmp_path)
    clock = FakeClock(time.time())
    sweeper = Sweeper(store, KeyedLocks(), retention_s=60.0, staging_timeout_s=600.0, clock=clock)
    await commit(store, "closing", "a", 1)
    await commit(store, "open", "b", 1)
    await store.mark_closed("closing", clock())

    clock.now_s += 59.0
    assert (await sweeper.sweep_once()).expired_sessions == ()
    assert await store.head("closing") is not None

    clock.now_s += 1.0
    assert (await sweeper.sweep_once()).expired_sessions == ("closing",)
    assert await store.head("closing") is None and await store.closed_sessions() == {}
    assert await store.head("open") is not None


async def test_the_sweeper_removes_a_dead_writers_bytes_only_after_the_staging_timeout(tmp_path: Path) -> None:
    store = DirectorySnapshotStore(tmp_path)
    clock = FakeClock(time.time())
    sweeper = Sweeper(store, KeyedLocks(), retention_s=60.0, staging_timeout_s=300.0, clock=clock)
    await commit(store, "s1", "kept", 1)
    await store.stage("s1", "abandoned", [b"never committed"])

    assert (await sweeper.sweep_once()).orphans_removed == ()
    clock.now_s += 301.0
    report = await sweeper.sweep_once()
    assert [blob.snapshot_id for blob in report.orphans_removed] == ["abandoned"]
    assert [blob.snapshot_id for blob in await store.blobs()] == ["kept"]


async def test_the_sweep_loop_sweeps_at_once_and_stops_when_cancelled(tmp_path: Path) -> None:
    store = DirectorySnapshotStore(tmp_path)
    clock = FakeClock(time.time())
    await commit(store, "closed", "a", 1)
    await store.mark_closed("closed", clock() - 10.0)
    sweeper = Sweeper(store, KeyedLocks(), retention_s=1.0, staging_timeout_s=10.0, clock=clock)
    sweeping = asyncio.create_task(sweeper.run(interval_s=3600.0))
    deadline = time.monotonic() + 5.0
    while await store.head("closed") is not None and time.monotonic() < deadline:
        await asyncio.sleep(0.01)  # polling for the first sweep's effect, bounded
    sweeping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sweeping
    assert await store.head("closed") is None


async def test_the_sweep_loop_stops_even_when_a_sweep_swallows_the_cancel(tmp_path: Path) -> None:
    """As Python 3.11's wait_for inside the NATS client can: the cancel arrives mid-sweep and never surfaces."""
    store = DirectorySnapshotStore(tmp_path)
    sweeper = Sweeper(store, KeyedLocks(), retention_s=1.0, staging_timeout_s=10.0, clock=time.time)
    sweeping_once = asyncio.Event()
    sweep_once = sweeper.sweep_once

    async def swallowing_sweep() -> object:
        sweeping_once.set()
        try:
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            pass  # swallowed
        return await sweep_once()

    sweeper.sweep_once = swallowing_sweep  # type: ignore[method-assign]
    sweeping = asyncio.create_task(sweeper.run(interval_s=0.01))
    await asyncio.wait_for(sweeping_once.wait(), 5.0)
    sweeping.cancel()
    deadline = time.monotonic() + 5.0
    while not sweeping.done() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert sweeping.done() and sweeping.cancelled(), "the sweep loop ran on after its cancel was swallowed"


async def test_per_session_locks_serialise_one_session_and_are_forgotten_when_free() -> None:
    locks = KeyedLocks()
    order: list[str] = []
    first_inside, release_first = asyncio.Event(), asyncio.Event()

    async def first() -> None:
        async with locks.hold("s1"):
            order.append("first in")
            first_inside.set()
            await release_first.wait()
            order.append("first out")

    async def second() -> None:
        async with locks.hold("s1"):
            order.append("second in")

    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(first())
        await first_inside.wait()
        tasks.create_task(second())
        async with locks.hold("other"):  # another session is not blocked by s1
            order.append("other")
        release_first.set()
    assert order == ["first in", "other", "first out", "second in"]
    assert locks._locks == {}


@pytest.mark.parametrize("retention_s", [0.0, 5.0])
def test_a_session_closed_exactly_retention_ago_is_due(retention_s: float) -> None:
    assert due_for_expiry({"s": 10.0}, now_s=10.0 + retention_s, retention_s=retention_s) == ["s"]
