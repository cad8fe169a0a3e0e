"""Snapshots as files under one directory: bytes in ``blobs/<session>/<snapshot>.blob``, the head in
``heads/<session>.head``, the closed mark in ``closed/<session>.closed``.

Atomicity comes from POSIX rename: bytes are written to ``.partial`` and renamed once fsynced, a head is written to
a temporary file, fsynced and renamed over the old one, so a reader opens either the old head or the new one. The
file work is blocking and runs in a thread. One process (the state_store service, one replica: a head's compare
and rename is not atomic across processes) commits; clients on the same host or a shared volume stage and read
directly.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import msgpack

from services.common.snapshots import MAX_HEAD_BYTES, SnapshotHead, StoreLocation, check_id
from services.common.wire import decode, encode
from services.state_store.errors import SessionClosed, SnapshotCorrupt, SnapshotGone, SnapshotIncomplete
from services.state_store.protocol import BlobRef, Buffer, StagedBlob, byte_view, check_fresh, split, supersedes

_BLOB = ".blob"
_PARTIAL = ".partial"


class DirectorySnapshotStore:
    """A SnapshotStore on a local or shared filesystem."""

    def __init__(self, root: Path) -> None:
        self._root = root
        for sub in ("blobs", "heads", "closed"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    @property
    def location(self) -> StoreLocation:
        return StoreLocation(backend="directory", name=str(self._root.resolve()))

    async def stage(self, session_id: str, snapshot_id: str, buffers: Sequence[Buffer]) -> StagedBlob:
        return await asyncio.to_thread(self._stage, check_id("session_id", session_id), snapshot_id, buffers)

    async def commit(self, head: SnapshotHead, *, staged_after_s: float = -math.inf) -> bool:
        return await asyncio.to_thread(self._commit, head, staged_after_s)

    async def head(self, session_id: str) -> SnapshotHead | None:
        return await asyncio.to_thread(self._head, check_id("session_id", session_id))

    async def read(self, head: SnapshotHead) -> list[memoryview]:
        data = await asyncio.to_thread(self._read, head)
        return split(data, head.buffer_bytes)

    async def discard(self, session_id: str, snapshot_id: str) -> None:
        blob = self._blob(session_id, snapshot_id)
        await asyncio.to_thread(blob.unlink, missing_ok=True)
        await asyncio.to_thread(blob.with_suffix(_PARTIAL).unlink, missing_ok=True)

    async def delete(self, session_id: str) -> None:
        check_id("session_id", session_id)
        await asyncio.to_thread(self._delete, session_id)

    async def mark_closed(self, session_id: str, closed_at_s: float) -> None:
        path = self._root / "closed" / f"{check_id('session_id', session_id)}.closed"
        await asyncio.to_thread(_write_atomically, path, msgpack.packb(closed_at_s))

    async def closed_sessions(self) -> dict[str, float]:
        return await asyncio.to_thread(self._closed_sessions)

    async def blobs(self) -> list[BlobRef]:
        return await asyncio.to_thread(self._blobs)

    # --- blocking work, run in a thread -------------------------------------------------------------------------

    def _blob(self, session_id: str, snapshot_id: str) -> Path:
        return (
            self._root / "blobs" / check_id("session_id", session_id) / f"{check_id('snapshot_id', snapshot_id)}{_BLOB}"
        )

    def _stage(self, session_id: str, snapshot_id: str, buffers: Sequence[Buffer]) -> StagedBlob:
        final = self._blob(session_id, snapshot_id)
        final.parent.mkdir(exist_ok=True)
        partial = final.with_suffix(_PARTIAL)
        digest, total = hashlib.sha256(), 0
        with open(partial, "wb") as out:
            for buf in buffers:
                view = byte_view(buf)
                digest.update(view)
                out.write(view)
                total += view.nbytes
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, final)
        return StagedBlob(total_bytes=total, digest=f"sha256:{digest.hexdigest()}")

    def _commit(self, head: SnapshotHead, staged_after_s: float) -> bool:
        blob = self._blob(head.session_id, head.snapshot_id)
        if (self._root / "closed" / f"{head.session_id}.closed").exists():
            raise SessionClosed(f"session {head.session_id} is closed; snapshot {head.snapshot_id} refused")
        try:
            stat = blob.stat()
        except FileNotFoundError:
            raise SnapshotIncomplete(f"snapshot {head.snapshot_id} of {head.session_id} was never staged") from None
        if stat.st_size != head.total_bytes:
            raise SnapshotIncomplete(
                f"snapshot {head.snapshot_id} has {stat.st_size} bytes, the head says {head.total_bytes}"
            )
        check_fresh(head, stat.st_mtime, staged_after_s)
        current = self._head(head.session_id)
        if not supersedes(current, head):
            return False
        _write_atomically(self._root / "heads" / f"{head.session_id}.head", encode(head))
        if current is not None:
            self._blob(current.session_id, current.snapshot_id).unlink(missing_ok=True)
        return True

    def _head(self, session_id: str) -> SnapshotHead | None:
        try:
            data = (self._root / "heads" / f"{session_id}.head").read_bytes()
        except FileNotFoundError:
            return None
        head = decode(data, max_bytes=MAX_HEAD_BYTES, expect=SnapshotHead)
        assert isinstance(head, SnapshotHead)
        return head

    def _read(self, head: SnapshotHead) -> bytearray:
        data = bytearray(head.total_bytes)
        try:
            with open(self._blob(head.session_id, head.snapshot_id), "rb") as src:
                got = src.readinto(data)
                extra = src.read(1)
        except FileNotFoundError:
            raise SnapshotGone(f"snapshot {head.snapshot_id} of {head.session_id} was superseded") from None
        if got != head.total_bytes or extra:
            raise SnapshotCorrupt(f"snapshot {head.snapshot_id} is not {head.total_bytes} bytes long")
        if f"sha256:{hashlib.sha256(data).hexdigest()}" != head.digest:
            raise SnapshotCorrupt(f"snapshot {head.snapshot_id} of {head.session_id} does not match its digest")
        return data

    def _delete(self, session_id: str) -> None:
        (self._root / "heads" / f"{session_id}.head").unlink(missing_ok=True)
        (self._root / "closed" / f"{session_id}.closed").unlink(missing_ok=True)
        shutil.rmtree(self._root / "blobs" / session_id, ignore_errors=True)

    def _closed_sessions(self) -> dict[str, float]:
        closed = {}
        for path in (self._root / "closed").glob("*.closed"):
            try:
                closed[path.stem] = float(msgpack.unpackb(path.read_bytes()))
            except FileNotFoundError:
                continue  # deleted by a concurrent delete between glob and read
        return closed

    def _blobs(self) -> list[BlobRef]:
        found = []
        for path in (self._root / "blobs").glob("*/*"):
            if path.suffix not in (_BLOB, _PARTIAL):
                continue
            try:
                found.append(BlobRef(path.parent.name, path.stem, path.stat().st_mtime))
            except FileNotFoundError:
                continue
        return found


def _write_atomically(path: Path, data: bytes) -> None:
    """Write beside ``path``, fsync, rename over it, fsync the directory: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
