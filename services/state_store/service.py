"""The state_store service: the committer of snapshot heads, answering small request-reply messages.

Snapshot bytes never pass through it: writers stage them straight into the store (JetStream chunks them; a GB state
never becomes one NATS message) and then ask the service to commit a head; readers get the head here and fetch the
bytes themselves. Every commit, delete, close and sweep of a session runs behind that session's lock, which is what
makes "newer wins, only the latest is kept, closed sessions expire" hold without readers locking.

Several replicas may serve one store in a queue group, so losing one loses only the requests it had in flight
(and clients resend one that nobody received). Their locks do not see each other; the JetStream store keeps the
rules on its own (``protocol.SnapshotStore``). Left open across replicas: a commit that read the closed mark just
before another replica wrote it still lands, and its snapshot expires with the session (with a retention of 0, an
expiry can pass under it and leave that head behind).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from nats.aio.client import Client as NatsClient

from services.common.endpoints import Endpoint, serve
from services.common.errors import UnknownSession
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
)
from services.common.wire import Message
from services.state_store.expiry import KeyedLocks, Sweeper, commit_cutoff_s
from services.state_store.protocol import SnapshotStore
from services.state_store.settings import StateStoreSettings, open_store

log = logging.getLogger("turboserve.state_store")


class StateStoreHandlers:
    """The actions behind each subject; every write of a session runs under that session's lock."""

    def __init__(
        self, store: SnapshotStore, locks: KeyedLocks, clock: Callable[[], float], *, staging_timeout_s: float
    ) -> None:
        self._store = store
        self._locks = locks
        self._clock = clock
        self._staging_timeout_s = staging_timeout_s

    async def describe(self, _: DescribeStore) -> Message:
        return self._store.location

    async def commit(self, head: SnapshotHead) -> Message:
        async with self._locks.hold(head.session_id):
            cutoff_s = commit_cutoff_s(self._clock(), self._staging_timeout_s)
            committed = await self._store.commit(head, staged_after_s=cutoff_s)
        log.info(
            "event=snapshot_committed session_id=%s epoch=%d chunk_seq=%d bytes=%d new=%s",
            head.session_id,
            head.epoch,
            head.chunk_seq,
            head.total_bytes,
            committed,
        )
        return Reply(ok=True, detail="committed" if committed else "already committed")

    async def get(self, query: SnapshotQuery) -> Message:
        head = await self._store.head(query.session_id)
        if head is None:
            raise UnknownSession(f"no snapshot of session {query.session_id}")
        return head

    async def delete(self, query: SnapshotQuery) -> Message:
        async with self._locks.hold(query.session_id):
            await self._store.delete(query.session_id)
        log.info("event=snapshot_deleted session_id=%s", query.session_id)
        return Reply(ok=True)

    async def close(self, query: SnapshotQuery) -> Message:
        async with self._locks.hold(query.session_id):
            await self._store.mark_closed(query.session_id, self._clock())
        log.info("event=session_closed session_id=%s", query.session_id)
        return Reply(ok=True)


async def run_state_store(
    settings: StateStoreSettings,
    nats_client: NatsClient,
    stop: asyncio.Event,
    *,
    clock: Callable[[], float] = time.time,
) -> None:
    """Serve until ``stop`` is set: open (or create) the store, add the endpoints, sweep in the background."""
    store = await open_store(settings.location, nats_client, create=True, replicas=settings.replicas)
    locks = KeyedLocks()
    handlers = StateStoreHandlers(store, locks, clock, staging_timeout_s=settings.staging_timeout_s)
    sweeper = Sweeper(
        store, locks, retention_s=settings.retention_s, staging_timeout_s=settings.staging_timeout_s, clock=clock
    )
    endpoints = [
        Endpoint.typed("describe", STATE_DESCRIBE, DescribeStore, handlers.describe, MAX_HEAD_BYTES),
        Endpoint.typed("commit", STATE_COMMIT, SnapshotHead, handlers.commit, MAX_HEAD_BYTES),
        Endpoint.typed("get", STATE_GET, SnapshotQuery, handlers.get, MAX_HEAD_BYTES),
        Endpoint.typed("delete", STATE_DELETE, SnapshotQuery, handlers.delete, MAX_HEAD_BYTES),
        Endpoint.typed("close", STATE_CLOSE, SnapshotQuery, handlers.close, MAX_HEAD_BYTES),
    ]
    service = await serve(nats_client, service="state_store", description="durable session snapshots",
                          endpoints=endpoints, queue_group="state_store", log=log)
    try:
        log.info("event=state_store_ready backend=%s name=%s", store.location.backend, store.location.name)
        async with asyncio.TaskGroup() as tasks:
            sweeping = tasks.create_task(sweeper.run(settings.sweep_interval_s))
            await stop.wait()
            sweeping.cancel()  # a sweep stuck on an unreachable JetStream must not hold up shutdown
    finally:
        await service.stop()
