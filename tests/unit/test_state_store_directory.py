"""The directory snapshot store keeps the store invariants on a plain filesystem: atomic commit, newest wins,
only the latest kept, closed sessions refuse writes, damage is detected."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from services.common.errors import InvalidField
from services.common.snapshots import SnapshotHead
from services.common.wire import decode, encode
from services.state_store.directory_store import DirectorySnapshotStore
from services.state_store.errors import (
    SessionClosed,
    SnapshotCorrupt,
    SnapshotGone,
    SnapshotIncomplete,
    StaleSnapshot,
    error_for_code,
)
from services.state_store.protocol import Buffer, StagedBlob, new_head

MANIFEST: dict[str, object] = {"buffers": [["float32", 4]], "views": [["kv", "float32", [2, 2], 0, 0]]}


async def put(
    store: DirectorySnapshotStore, snapshot_id: str, epoch: int, chunk_seq: int, *buffers: Buffer
) -> SnapshotHead:
    staged = await store.stage("s1", snapshot_id, buffers)
    head = new_head("s1", snapshot_id, epoch, chunk_seq, MANIFEST, buffers, staged)
    await store.commit(head)
    return head


async def test_a_committed_snapshot_reads_back_bit_exact_with_its_manifest(tmp_path: Path) -> None:
    store = DirectorySnapshotStore(tmp_path)
    first, second = os.urandom(3000), os.urandom(5)
    head = await put(store, "a", 1, 7, first, memoryview(second))
    stored = await store.head("s1")
    assert stored == head and stored.manifest == MANIFEST and stored.buffer_bytes == (3000, 5)
    assert [bytes(view) for view in await store.read(stored)] == [first, second]


async def test_staged_bytes_stay_invisible_until_the_head_is_committed(tmp_path: Path) -> None:
    store = DirectorySnapshotStore(tmp_path)
    old = await put(store, "old", 1, 1, b"old state")
    await store.stage("s1", "new", [b"new state"])
    current = await store.head("s1")
    assert current == old
    assert [bytes(v) for v in await store.read(current)] == [b"old state"]


async def test_a_newer_snapshot_supersedes_the_old_one_and_removes_its_bytes(tmp_path: Path) -> None:
    store = DirectorySnapshotStore(tmp_path)
    old = await put(store, "old", 1, 1, b"old")
    new = await put(store, "new", 1, 2, b"newer")
    assert await store.head("s1") == new
    assert [blob.snapshot_id for blob in await store.blobs()] == ["new"]
    with pytest.raises(SnapshotGone):
        await store.read(old)


async def test_a_stale_owner_cannot_roll_a_session_back_but_a_new_epoch_may_restart_its_count(tmp_path: Path) -> None:
    store = DirectorySnapshotStore(tmp_path)
    await put(store, "e1", 1, 10, b"x")
    with pytest.raises(StaleSnapshot, match="epoch=1 chunk_seq=10"):
        await put(store, "e1late", 1, 10, b"y")
    newer_epoch = await put(store, "e2", 2, 3, b"z")
    with pytest.raises(StaleSnapshot):
        await put(store, "e1later", 1, 99, b"w")
    assert await store.head("s1") == newer_epoch


async def test_committing_the_same_head_twice_is_a_no_op(tmp_path: Path) -> None:
    store = DirectorySnapshotStore(tmp_path)
    head = await put(store, "a", 1, 1, b"x")
    assert await store.commit(head) is False
    assert await store.head("s1") == head


async def test_a_head_naming_bytes_never_staged_or_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    store = DirectorySnapshotStore(tmp_path)
    staged = await store.stage("s1", "a", [b"1234"])
    with pytest.raises(SnapshotIncomplete, match="never staged"):
        await store.commit(new_head("s1", "ghost", 1, 1, {}, [b"1234"], staged))
    with pytest.raises(SnapshotIncomplete, match="4 bytes"):
        await store.commit(new_head("s1", "a", 1, 1, {}, [b"12345"], staged))


async def test_a_head_naming_bytes_staged_before_the_cutoff_is_refused(tmp_path: Path) -> None:
    store = DirectorySnapshotStore(tmp_path)
    staged = await store.stage("s1", "a", [b"1234"])
    head = new_head("s1", "a", 1, 1, {}, [b"1234"], staged)
    with pytest.raises(SnapshotIncomplete, match="too long ago"):
        await store.commit(head, staged_after_s=time.time() + 60.0)
    assert await store.head("s1") is None
    assert await store.commit(head, staged_after_s=time.time() - 60.0) is True


async def test_a_closed_session_refuses_new_snapshots_until_deleted(tmp_path: Path) -> None:
    store = DirectorySnapshotStore(tmp_path)
    await put(store, "a", 1, 1, b"x")
    await store.mark_closed("s1", 1000.0)
    assert await store.closed_sessions() == {"s1": 1000.0}
    with pytest.raises(SessionClosed):
        await put(store, "b", 1, 2, b"y")
    await store.delete("s1")
    assert await store.head("s1") is None and await store.blobs() == [] and await store.closed_sessions() == {}


async def test_bytes_that_no_longer_match_their_digest_are_reported_as_corrupt(tmp_path: Path) -> None:
    store = DirectorySnapshotStore(tmp_path)
    head = await put(store, "a", 1, 1, b"abcdef")
    (tmp_path / "blobs" / "s1" / "a.blob").write_bytes(b"abcdeF")
    with pytest.raises(SnapshotCorrupt, match="digest"):
        await store.read(head)


async def test_a_second_store_on_the_same_directory_sees_what_the_first_committed(tmp_path: Path) -> None:
    head = await put(DirectorySnapshotStore(tmp_path), "a", 3, 4, b"durable")
    reopened = DirectorySnapshotStore(tmp_path)
    assert await reopened.head("s1") == head
    assert [bytes(v) for v in await reopened.read(head)] == [b"durable"]


async def test_ids_that_could_escape_the_directory_are_refused(tmp_path: Path) -> None:
    store = DirectorySnapshotStore(tmp_path)
    with pytest.raises(InvalidField):
        await store.stage("../etc", "a", [b"x"])
    with pytest.raises(InvalidField):
        await store.head("a/b")


def test_a_head_survives_the_wire_and_refuses_a_bad_digest() -> None:
    head = new_head("s1", "a", 2, 5, MANIFEST, [b"ab", b"c"], StagedBlob(total_bytes=3, digest="sha256:00"))
    assert decode(encode(head), expect=SnapshotHead) == head
    with pytest.raises(InvalidField, match="digest"):
        SnapshotHead("s1", "a", 1, 0, 0.0, (1,), "md5:00").check()


def test_a_remote_error_code_comes_back_as_the_same_exception_class() -> None:
    assert isinstance(error_for_code("stale_snapshot", "late"), StaleSnapshot)
    assert isinstance(error_for_code("session_closed", "x"), SessionClosed)
    assert "weird: x" in str(error_for_code("weird", "x"))
