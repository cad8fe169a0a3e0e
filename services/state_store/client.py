"""What workers use: put a snapshot, get a session's latest one back bit-exact, delete it, mark a session closed.

A put stages the bytes straight into the store under a fresh id and then asks the service to commit the head; only
then does any reader see it. A get asks the service for the head and reads the bytes itself; if a newer commit
removed them mid-read it asks again. The first call asks the service where the store lives (``StoreLocation``), so
workers need no store settings of their own.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence

import msgpack
from nats.aio.client import Client as NatsClient

from services.common import requests
from services.common.errors import InvalidField, MalformedMessage, UnknownSession
from services.common.messages import Reply
from services.common.snapshots import (
    MAX_HEAD_BYTES,
    STATE_CLOSE,
    STATE_COMMIT,
    STATE_DELETE,
    STATE_DESCRIBE,
    STATE_GET,
    DescribeStore,
    SnapshotHead,
    SnapshotQuery,
    StoreLocation,
    check_id,
)
from services.common.wire import Message, decode, encode
from services.state_store.errors import SnapshotGone, error_for_code
from services.state_store.protocol import Buffer, Snapshot, SnapshotStore, new_head
from services.state_store.settings import open_store

log = logging.getLogger("turboserve.state_store.client")
_HEAD_FIELDS_BYTES = 4096
"""Room a head needs besides its manifest (ids, sizes, digest), so an oversized manifest fails before any upload."""


class SnapshotClient:
    """A worker's handle on the state_store; safe to share between the tasks of one event loop."""

    def __init__(self, nc: NatsClient, *, request_timeout_s: float = 5.0, read_attempts: int = 3) -> None:
        self._nc = nc
        self._request_timeout_s = request_timeout_s
        self._read_attempts = read_attempts
        self._store: SnapshotStore | None = None
        self._store_lock = asyncio.Lock()

    async def put(
        self,
        session_id: str,
        epoch: int,
        chunk_seq: int,
        manifest: dict[str, object],
        buffers: Sequence[Buffer],
    ) -> SnapshotHead:
        """Store the session's state taken after chunk ``chunk_seq`` and make it the latest; returns its head.

        Raises StaleSnapshot if a snapshot at the same or a later (epoch, chunk_seq) is already committed,
        SessionClosed after ``mark_closed``, Unavailable if the service does not answer (the commit may or may not
        have landed; bytes of one that did not are swept after the staging timeout).
        """
        check_id("session_id", session_id)
        manifest_bytes = len(msgpack.packb(manifest, use_bin_type=True))
        if manifest_bytes + _HEAD_FIELDS_BYTES > MAX_HEAD_BYTES:
            raise InvalidField(f"manifest of {manifest_bytes} bytes exceeds the head limit of {MAX_HEAD_BYTES} bytes")
        store = await self._open()
        snapshot_id = uuid.uuid4().hex
        staged = await store.stage(session_id, snapshot_id, buffers)
        head = new_head(session_id, snapshot_id, epoch, chunk_seq, manifest, buffers, staged)
        answer = await self._call(STATE_COMMIT, head)
        if isinstance(answer, Reply) and answer.ok:
            return head
        await store.discard(session_id, snapshot_id)  # refused for sure, so nothing will ever name these bytes
        raise _failure(answer)

    async def get_latest(self, session_id: str) -> Snapshot | None:
        """The session's latest committed snapshot, verified against its digest, or None if it has none."""
        store = await self._open()
        for _ in range(self._read_attempts):
            answer = await self._call(STATE_GET, SnapshotQuery(session_id=session_id))
            if isinstance(answer, Reply) and answer.code == UnknownSession.code:
                return None
            if not isinstance(answer, SnapshotHead):
                raise _failure(answer)
            try:
                return Snapshot.from_head(answer, await store.read(answer))
            except SnapshotGone:
                log.info("event=snapshot_superseded_while_read session_id=%s", session_id)
        raise SnapshotGone(f"session {session_id}: superseded {self._read_attempts} times while being read")

    async def delete(self, session_id: str) -> None:
        """Remove every snapshot of the session now."""
        await self._expect_ok(STATE_DELETE, SnapshotQuery(session_id=session_id))

    async def mark_closed(self, session_id: str) -> None:
        """The session ended: refuse new snapshots and expire the latest after the retention time."""
        await self._expect_ok(STATE_CLOSE, SnapshotQuery(session_id=session_id))

    async def _open(self) -> SnapshotStore:
        async with self._store_lock:
            if self._store is None:
                location = await self._call(STATE_DESCRIBE, DescribeStore())
                if not isinstance(location, StoreLocation):
                    raise _failure(location)
                self._store = await open_store(location, self._nc, create=False)
            return self._store

    async def _expect_ok(self, subject: str, request: Message) -> None:
        answer = await self._call(subject, request)
        if not (isinstance(answer, Reply) and answer.ok):
            raise _failure(answer)

    async def _call(self, subject: str, request: Message) -> Message:
        """Every state_store request is idempotent, and the service may run as several replicas: one nobody was
        subscribed to (between a replica's death and its restart) is sent again within the deadline."""
        msg = await requests.request(self._nc, subject, encode(request), timeout_s=self._request_timeout_s,
                                     resend=True)
        return decode(msg.data, max_bytes=MAX_HEAD_BYTES)


def _failure(answer: Message) -> Exception:
    if isinstance(answer, Reply):
        return error_for_code(answer.code, answer.detail)
    return MalformedMessage(f"state_store answered with an unexpected {answer.TYPE!r} message")
