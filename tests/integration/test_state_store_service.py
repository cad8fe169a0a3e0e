"""The state_store service on a real nats-server with JetStream: snapshots go in through the client and come back
bit-exact, newer ones supersede, closed sessions expire, readers never see a half-written snapshot, and a restarted
service still serves what was stored."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import nats
import nats.errors
import pytest
import torch
from nats.aio.client import Client as NatsClient
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE

from services.common.errors import Unavailable
from services.common.messages import Reply
from services.common.snapshots import STATE_COMMIT, SnapshotHead
from services.common.wire import decode, encode
from services.state_store.client import SnapshotClient
from services.state_store.errors import CommitConflict, SessionClosed, SnapshotGone, SnapshotIncomplete, StaleSnapshot
from services.state_store.expiry import KeyedLocks, Sweeper
from services.state_store.jetstream_blobs import chunk_nuids, nuid_of
from services.state_store.jetstream_store import JetStreamSnapshotStore
from services.state_store.protocol import new_head
from services.state_store.service import run_state_store
from services.state_store.settings import StateStoreSettings

pytestmark = pytest.mark.integration
MB = 1 << 20


class FakeClock:
    def __init__(self) -> None:
        self.now_s = time.time()

    def __call__(self) -> float:
        return self.now_s


def settings_for(bucket: str, **changes: object) -> StateStoreSettings:
    base = StateStoreSettings(
        backend="jetstream",
        bucket=bucket,
        directory=Path("/nonexistent"),
        retention_s=60.0,
        sweep_interval_s=0.05,
        staging_timeout_s=600.0,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def serving(
    settings: StateStoreSettings, nc: NatsClient, clock: Callable[[], float] = time.time
) -> AsyncIterator[SnapshotClient]:
    """Run the service until the block ends; yields a client once the service answers (retried, not slept)."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_state_store(settings, nc, stop, clock=clock))
    client = SnapshotClient(nc, request_timeout_s=2.0)
    try:
        await wait_until(lambda: _answers(client), timeout_s=10.0)
        yield client
    finally:
        stop.set()
        await task


async def _answers(client: SnapshotClient) -> bool:
    try:
        return await client.get_latest("probe") is None
    except Unavailable:  # not subscribed yet: no responders
        return False


async def wait_until(condition: Callable[[], object], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():  # type: ignore[misc]
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.02)


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NatsClient]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


@pytest.fixture
def bucket() -> str:
    return f"snap_{uuid.uuid4().hex[:12]}"


def state(seed: int, total_bytes: int) -> list[torch.Tensor]:
    """A KV-cache-like state: one big bf16 tensor and a small int64 cursor, as uint8 views."""
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(total_bytes // 2, generator=gen).to(torch.bfloat16)
    cursor = torch.tensor([seed, 7, 9], dtype=torch.int64)
    return [kv, cursor]


def as_buffers(tensors: list[torch.Tensor]) -> list[memoryview]:
    return [t.view(torch.uint8).numpy().data for t in tensors]


MANIFEST: dict[str, object] = {"views": [["kv", "bfloat16", [-1], 0, 0], ["cursor", "int64", [3], 1, 0]]}


async def test_a_multi_megabyte_snapshot_comes_back_bit_exact(nc: NatsClient, bucket: str) -> None:
    tensors = state(1, 24 * MB)
    async with serving(settings_for(bucket), nc) as client:
        head = await client.put("s1", 1, 41, MANIFEST, as_buffers(tensors))
        snap = await client.get_latest("s1")
    assert snap is not None and (snap.session_id, snap.epoch, snap.chunk_seq) == ("s1", 1, 41)
    assert snap.manifest == MANIFEST and snap.created_at == head.created_at
    kv = torch.frombuffer(snap.buffers[0], dtype=torch.bfloat16)
    cursor = torch.frombuffer(snap.buffers[1], dtype=torch.int64)
    assert torch.equal(kv, tensors[0]) and torch.equal(cursor, tensors[1])


async def test_a_newer_snapshot_supersedes_and_only_the_latest_is_kept(nc: NatsClient, bucket: str) -> None:
    async with serving(settings_for(bucket), nc) as client:
        await client.put("s1", 1, 3, {}, [os.urandom(2 * MB)])
        newest = os.urandom(3 * MB)
        await client.put("s1", 1, 6, {}, [newest])
        with pytest.raises(StaleSnapshot):
            await client.put("s1", 1, 5, {}, [b"late writer"])
        snap = await client.get_latest("s1")
        store = await JetStreamSnapshotStore.open(nc, bucket, create=False)
        blobs = await store.blobs()
    assert snap is not None and snap.chunk_seq == 6 and bytes(snap.buffers[0]) == newest
    assert len(blobs) == 1, "the superseded and the refused snapshots' bytes are removed"


async def test_a_closed_session_refuses_snapshots_and_expires_after_its_retention(nc: NatsClient, bucket: str) -> None:
    clock = FakeClock()
    async with serving(settings_for(bucket, retention_s=30.0), nc, clock) as client:
        await client.put("s1", 2, 8, {}, [os.urandom(MB)])
        await client.mark_closed("s1")
        with pytest.raises(SessionClosed):
            await client.put("s1", 2, 9, {}, [b"after close"])
        assert await client.get_latest("s1") is not None, "kept during the retention time"
        clock.now_s += 31.0
        await wait_until(lambda: _is_gone(client, "s1"), timeout_s=10.0)


async def _is_gone(client: SnapshotClient, session_id: str) -> bool:
    return await client.get_latest(session_id) is None


async def test_a_reader_during_a_write_sees_the_old_snapshot_whole(nc: NatsClient, bucket: str) -> None:
    old, new = os.urandom(4 * MB), os.urandom(16 * MB)
    async with serving(settings_for(bucket), nc) as client:
        await client.put("s1", 1, 1, {}, [old])
        store = await JetStreamSnapshotStore.open(nc, bucket, create=False)
        staged = await store.stage("s1", "pending", [new])  # the bytes are in the bucket, the head is not yet
        during = await client.get_latest("s1")
        await store.commit(new_head("s1", "pending", 1, 2, {}, [new], staged))
        after = await client.get_latest("s1")

        writer = asyncio.create_task(client.put("s1", 1, 3, {}, [old]))
        concurrent = await client.get_latest("s1")
        await writer
    assert during is not None and bytes(during.buffers[0]) == old
    assert after is not None and bytes(after.buffers[0]) == new
    assert concurrent is not None and bytes(concurrent.buffers[0]) in (old, new)


async def test_a_reader_holding_a_superseded_head_is_told_so_instead_of_hanging(nc: NatsClient, bucket: str) -> None:
    async with serving(settings_for(bucket), nc) as client:
        await client.put("s1", 1, 1, {}, [b"first"])
        store = await JetStreamSnapshotStore.open(nc, bucket, create=False, timeout_s=0.3)
        first = await store.head("s1")
        await client.put("s1", 2, 0, {}, [b"second"])
        assert isinstance(first, SnapshotHead)
        with pytest.raises(SnapshotGone):
            await store.read(first)

        second = await store.head("s1")
        assert isinstance(second, SnapshotHead)
        chunks = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=nuid_of("s1", second.snapshot_id))
        await nc.jetstream().purge_stream(f"OBJ_{bucket}", subject=chunks)  # the chunks go, the meta is still there
        with pytest.raises(SnapshotGone, match="no chunk"):
            await store.read(second)


async def test_a_reader_whose_chunks_are_purged_hears_of_it_long_before_its_chunk_timeout(
    nc: NatsClient, bucket: str
) -> None:
    async with serving(settings_for(bucket), nc) as client:
        await client.put("s1", 1, 1, {}, [b"state" * 1000])
        store = await JetStreamSnapshotStore.open(nc, bucket, create=False, timeout_s=30.0)
        head = await store.head("s1")
        assert isinstance(head, SnapshotHead)
        chunks = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=nuid_of("s1", head.snapshot_id))
        await nc.jetstream().purge_stream(f"OBJ_{bucket}", subject=chunks)
        started = time.monotonic()
        with pytest.raises(SnapshotGone, match="purged"):
            await store.read(head)
    assert time.monotonic() - started < 10.0, "told by asking the stream, not by waiting out the 30 s timeout"


async def test_bytes_of_a_writer_that_died_mid_upload_are_swept_after_the_staging_timeout(
    nc: NatsClient, bucket: str
) -> None:
    clock = FakeClock()
    async with serving(settings_for(bucket), nc):
        store = await JetStreamSnapshotStore.open(nc, bucket, create=True)
        js = nc.jetstream()
        for _ in range(3):  # chunks published, meta never written: the writer was killed
            await js.publish(OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=nuid_of("s1", "dead")), b"x" * 1000)
        await store.stage("s2", "uncommitted", [os.urandom(MB)])
        sweeper = Sweeper(store, KeyedLocks(), retention_s=60.0, staging_timeout_s=300.0, clock=clock)
        assert (await sweeper.sweep_once()).orphans_removed == ()
        clock.now_s += 301.0
        removed = (await sweeper.sweep_once()).orphans_removed
        assert sorted(blob.snapshot_id for blob in removed) == ["dead", "uncommitted"]
        assert await chunk_nuids(js, bucket) == set() and await store.blobs() == []


async def test_a_restarted_service_still_serves_what_was_stored(nc: NatsClient, bucket: str) -> None:
    payload = os.urandom(6 * MB)
    async with serving(settings_for(bucket), nc) as client:
        await client.put("s1", 3, 12, {"views": []}, [payload, b"rng"])
    async with serving(settings_for(bucket), nc) as restarted:
        snap = await restarted.get_latest("s1")
        await restarted.delete("s1")
        assert await restarted.get_latest("s1") is None
    assert snap is not None and (snap.epoch, snap.chunk_seq) == (3, 12)
    assert [bytes(b) for b in snap.buffers] == [payload, b"rng"]


async def test_the_directory_backend_serves_clients_through_a_shared_path(nc: NatsClient, tmp_path: Path) -> None:
    settings = settings_for("unused", backend="directory", directory=tmp_path)
    payload = os.urandom(2 * MB)
    async with serving(settings, nc) as client:
        await client.put("s1", 1, 0, {}, [payload])
        snap = await client.get_latest("s1")
    assert snap is not None and bytes(snap.buffers[0]) == payload
    assert list((tmp_path / "heads").iterdir()) == [tmp_path / "heads" / "s1.head"]


async def test_sweeping_again_and_again_leaves_no_consumer_behind(nc: NatsClient, bucket: str) -> None:
    """A sweep lists closed sessions and stored objects; a JetStream consumer per listing outlived it, and a
    sweep every 50 ms piled them up until the server refused new ones, readers' included."""
    store = await JetStreamSnapshotStore.open(nc, bucket, create=True)
    await store.mark_closed("s1", 10.0)
    await store.stage("s2", "kept", [b"state"])
    js = nc.jetstream()
    streams = (f"OBJ_{bucket}", f"KV_{bucket}_closed")

    async def consumers() -> int:
        return sum([(await js.stream_info(stream)).state.consumer_count for stream in streams])

    before = await consumers()
    for _ in range(20):
        assert await store.closed_sessions() == {"s1": 10.0}
        assert [blob.snapshot_id for blob in await store.blobs()] == ["kept"]
    assert await consumers() == before


@contextlib.asynccontextmanager
async def replica(settings: StateStoreSettings, nats_url: str, clock: Callable[[], float] = time.time,
                  ) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """One more state_store process on its own connection; yields ``kill``: its connection goes without a goodbye
    (the server drops its subscriptions, as for a killed process) and its task is cancelled."""
    connection = await nats.connect(nats_url, allow_reconnect=False)
    task = asyncio.create_task(run_state_store(settings, connection, asyncio.Event(), clock=clock))

    async def kill() -> None:
        task.cancel()
        await connection.close()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            async with asyncio.timeout(10.0):  # a shutdown stuck on the closed connection fails, never hangs
                await task

    try:
        yield kill
    finally:
        await kill()


async def requests_served(nc: NatsClient) -> list[int]:
    """The commits each running state_store replica has answered, from the micro services' own stats."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish("$SRV.STATS.turboserve_state_store", b"", reply=inbox)
    counts = []
    with contextlib.suppress(nats.errors.TimeoutError):
        while True:
            stats = json.loads((await sub.next_msg(timeout=0.5)).data)
            counts += [e["num_requests"] for e in stats["endpoints"] if e["name"] == "commit"]
    await sub.unsubscribe()
    return counts


async def test_two_replicas_commit_one_session_in_turn_and_either_may_die(
    nc: NatsClient, nats_url: str, bucket: str,
) -> None:
    """Concurrent commits of one session, spread over two replicas whose session locks do not see each other,
    still leave the newest acknowledged snapshot as the head and only its bytes; killing a replica loses nothing
    after it, since the other answers in the same queue group."""
    settings = settings_for(bucket)
    client = SnapshotClient(nc, request_timeout_s=5.0)
    async with replica(settings, nats_url), replica(settings, nats_url) as kill_second:
        await wait_until(lambda: _answers(client), timeout_s=10.0)
        store = await JetStreamSnapshotStore.open(nc, bucket, create=False)
        seqs = random.Random(7).sample(range(1, 201), 60)
        heads = []
        for seq in seqs:  # all staged first, so the commits reach the replicas together
            payload, snapshot_id = [seq.to_bytes(2, "big") * 999], uuid.uuid4().hex
            staged = await store.stage("s1", snapshot_id, payload)
            heads.append(new_head("s1", snapshot_id, 1, seq, {}, payload, staged))
        answers = await asyncio.gather(*(nc.request(STATE_COMMIT, encode(head), timeout=10.0) for head in heads))
        replies = [decode(answer.data) for answer in answers]
        assert all(isinstance(reply, Reply) and (reply.ok or reply.code in (StaleSnapshot.code, CommitConflict.code))
                   for reply in replies), replies
        acknowledged = []
        for head, reply in zip(heads, replies, strict=True):
            if isinstance(reply, Reply) and reply.ok:
                acknowledged.append(head.chunk_seq)
            else:  # as the client does: nothing will ever name these bytes
                await store.discard("s1", head.snapshot_id)
        served = await requests_served(nc)
        assert len(served) == 2 and min(served) > 0, f"both replicas answered commits: {served}"
        snap = await client.get_latest("s1")
        assert snap is not None and snap.chunk_seq == max(acknowledged)
        assert bytes(snap.buffers[0]) == max(acknowledged).to_bytes(2, "big") * 999
        head = await store.head("s1")
        assert head is not None and [blob.snapshot_id for blob in await store.blobs()] == [head.snapshot_id]

        await kill_second()
        for seq in range(201, 221):  # every request now lands on the survivor, none is lost to the dead one
            await client.put("s1", 1, seq, {}, [b"after"])
            latest = await client.get_latest("s1")
            assert latest is not None and latest.chunk_seq == seq
        assert len(await requests_served(nc)) == 1


async def test_a_commit_long_after_its_staging_is_refused_so_no_sweep_can_remove_its_bytes(
    nc: NatsClient, bucket: str,
) -> None:
    """Half the staging timeout after its bytes were staged a commit is refused: past that, a sweep in another
    replica (whose session lock this commit does not take) may be removing them as orphans."""
    clock = FakeClock()
    async with serving(settings_for(bucket, staging_timeout_s=600.0), nc, clock) as client:
        await client.put("s1", 1, 1, {}, [b"in time"])
        clock.now_s += 301.0  # the service's clock: bytes staged now count as 301 s old
        with pytest.raises(SnapshotIncomplete, match="too long ago"):
            await client.put("s1", 1, 2, {}, [b"too late"])
        store = await JetStreamSnapshotStore.open(nc, bucket, create=False)
        snap = await client.get_latest("s1")
        assert snap is not None and snap.chunk_seq == 1
        head = await store.head("s1")
        assert head is not None and [blob.snapshot_id for blob in await store.blobs()] == [head.snapshot_id]


async def test_a_request_sent_while_no_replica_runs_is_answered_by_one_that_starts_within_its_deadline(
    nc: NatsClient, nats_url: str, bucket: str,
) -> None:
    """Between a replica's death and its restart nobody is subscribed; the client sends again instead of failing."""
    client = SnapshotClient(nc, request_timeout_s=5.0)
    asking = asyncio.create_task(client.get_latest("s1"))
    await asyncio.sleep(0.3)  # the request has found nobody, at least once
    assert not asking.done()
    async with replica(settings_for(bucket), nats_url):
        async with asyncio.timeout(5.0):
            assert await asking is None
    with pytest.raises(Unavailable):
        await SnapshotClient(nc, request_timeout_s=0.3).get_latest("s1")
