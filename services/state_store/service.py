"""The state_store service: the single committer of snapshot heads, answering small request-reply messages.

Snapshot bytes never pass through it: writers stage them straight into the store (JetStream chunks them; a GB state
never becomes one NATS message) and then ask the service to commit a head; readers get the head here and fetch the
bytes themselves. Keeping every commit, delete, close and sweep of a session behind one per-session lock in one
place is what makes "newer wins, only the latest is kept, closed sessions expire" hold without readers locking.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats import micro
from nats.aio.client import Client as NatsClient
from nats.micro.request import Request

from services.common.errors import TurboServeError, UnknownSession
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
from services.common.wire import Message, decode, encode
from services.state_store.expiry import KeyedLocks, Sweeper
from services.state_store.protocol import SnapshotStore
from services.state_store.settings import StateStoreSettings, open_store

log = logging.getLogger("turboserve.state_store")
M = TypeVar("M", bound=Message)
SERVICE_VERSION = "1.0.0"


class StateStoreHandlers:
    """The actions behind each subject; every write of a session runs under that session's lock."""

    def __init__(self, store: SnapshotStore, locks: KeyedLocks, clock: Callable[[], float]) -> None:
        self._store = store
        self._locks = locks
        self._clock = clock

    async def describe(self, _: DescribeStore) -> Message:
        return self._store.location

    async def commit(self, head: SnapshotHead) -> Message:
        async with self._locks.hold(head.session_id):
            committed = await self._store.commit(head)
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


def _endpoint(expect: type[M], action: Callable[[M], Awaitable[Message]]) -> Callable[[Request], Awaitable[None]]:
    """Decode, act, and always answer: a refusal becomes a Reply with the error's code, never a silent drop."""

    async def handle(request: Request) -> None:
        try:
            msg = decode(request.data, max_bytes=MAX_HEAD_BYTES, expect=expect)
            assert isinstance(msg, expect)
            answer = await action(msg)
        except asyncio.CancelledError:
            raise
        except TurboServeError as exc:
            answer = Reply(ok=False, code=exc.code, detail=str(exc))
        except Exception as exc:  # a bug or a lost JetStream: answer so the caller fails fast, and log it
            log.exception("event=request_failed subject=%s", request.subject)
            answer = Reply(ok=False, code="internal", detail=f"{type(exc).__name__}: {exc}")
        await request.respond(encode(answer))

    return handle


async def run_state_store(
    settings: StateStoreSettings,
    nats_client: NatsClient,
    stop: asyncio.Event,
    *,
    clock: Callable[[], float] = time.time,
) -> None:
    """Serve until ``stop`` is set: open (or create) the store, add the endpoints, sweep in the background."""
    store = await open_store(settings.location, nats_client, create=True)
    locks = KeyedLocks()
    handlers = StateStoreHandlers(store, locks, clock)
    sweeper = Sweeper(
        store, locks, retention_s=settings.retention_s, staging_timeout_s=settings.staging_timeout_s, clock=clock
    )
    service = await micro.add_service(
        nats_client,
        name="turboserve_state_store",
        version=SERVICE_VERSION,
        description="durable session snapshots",
        queue_group="state_store",
    )
    try:
        await service.add_endpoint(
            name="describe", subject=STATE_DESCRIBE, handler=_endpoint(DescribeStore, handlers.describe)
        )
        await service.add_endpoint(
            name="commit", subject=STATE_COMMIT, handler=_endpoint(SnapshotHead, handlers.commit)
        )
        await service.add_endpoint(name="get", subject=STATE_GET, handler=_endpoint(SnapshotQuery, handlers.get))
        await service.add_endpoint(
            name="delete", subject=STATE_DELETE, handler=_endpoint(SnapshotQuery, handlers.delete)
        )
        await service.add_endpoint(name="close", subject=STATE_CLOSE, handler=_endpoint(SnapshotQuery, handlers.close))
        log.info("event=state_store_ready backend=%s name=%s", store.location.backend, store.location.name)
        async with asyncio.TaskGroup() as tasks:
            sweeping = tasks.create_task(sweeper.run(settings.sweep_interval_s))
            await stop.wait()
            sweeping.cancel()  # a sweep stuck on an unreachable JetStream must not hold up shutdown
    finally:
        await service.stop()
