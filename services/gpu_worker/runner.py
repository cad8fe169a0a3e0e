"""The worker's only NATS code: the control endpoint, credit, heartbeats, and every publish (chunks, migration
reports, leaving); the engine, residency and migration agent get what they send through here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from services.common import subjects
from services.common.control import (
    DrainWorker,
    MigrationReport,
    OffloadSession,
    PrepareMigration,
    ProbeWorker,
    StartMigration,
)
from services.common.endpoints import Endpoint, serve
from services.common.errors import TurboServeError, Unavailable, UnknownMessageType
from services.common.keyed_tasks import KeyedTasks
from services.common.messages import (
    AttachSession,
    ChangePrompt,
    DetachSession,
    Reply,
    RequestChunks,
    WorkerGone,
    WorkerHeartbeat,
)
from services.common.telemetry.chunks import worker_chunk_traces
from services.common.telemetry.metrics import set_sessions
from services.common.wire import Message, decode, encode
from services.gpu_worker.engine import ChunkEngine
from services.gpu_worker.migration.agent import MigrationAgent
from services.gpu_worker.settings import WorkerSettings
from services.gpu_worker.state.residency import SessionResidency

log = logging.getLogger(__name__)


class WorkerOutbox:
    """What the worker publishes besides heartbeats, each on its subject."""

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc

    async def chunk(self, session_id: str, payload: bytes) -> None:
        """A chunk frame for the session's gateway, with trace headers when the chunk's trace is kept."""
        headers = worker_chunk_traces.published(session_id, payload)
        await self._nc.publish(subjects.chunks(session_id), payload, headers=headers)

    async def migration_report(self, report: MigrationReport) -> None:
        await self._nc.publish(subjects.SCHED_MIGRATION_REPORT, encode(report))


class WorkerRunner:
    def __init__(self, settings: WorkerSettings, nc: NatsClient, engine: ChunkEngine, *,
                 residency: SessionResidency | None = None, migrations: MigrationAgent | None = None) -> None:
        self._settings = settings
        self._nc = nc
        self._engine = engine
        self._residency = residency
        self._migrations = migrations
        self._started_at_s = time.time()
        self._draining = False
        self._tasks = KeyedTasks("worker")
        """One session's control messages and credits in their order, other sessions' beside them."""

    async def _handle_control(self, request: Message) -> Message:
        if isinstance(request, ProbeWorker):
            pass  # answering is the whole point
        elif isinstance(request, DrainWorker):
            self._draining = True
            log.info("event=draining worker=%s reason=%r", self._settings.worker_id, request.reason)
        elif isinstance(request, AttachSession):
            self._refuse_new_sessions_while_draining(request.session_id)
            await self._engine.attach(request)
        elif isinstance(request, ChangePrompt):
            self._engine.change_prompt(request)
        elif isinstance(request, DetachSession):
            await self._engine.detach(request)
        elif isinstance(request, OffloadSession) and self._residency is not None:
            await self._residency.offload(request)
        elif isinstance(request, PrepareMigration) and self._migrations is not None:
            self._refuse_new_sessions_while_draining(request.session_id)
            return await self._migrations.prepare(request)
        elif isinstance(request, StartMigration) and self._migrations is not None:
            await self._migrations.start(request)
        else:
            raise UnknownMessageType(f"{request.TYPE!r} is not a worker control message")
        return Reply(ok=True)

    def _refuse_new_sessions_while_draining(self, session_id: str) -> None:
        """A draining worker keeps serving its own sessions until they are moved, but takes no new ones."""
        if self._draining and session_id not in self._engine.sessions:
            raise Unavailable(f"worker {self._settings.worker_id} is draining and takes no new sessions")

    async def _on_credit(self, msg: Msg) -> None:
        try:
            request = decode(msg.data, expect=RequestChunks)
        except TurboServeError as exc:
            log.info("event=credit_refused worker=%s code=%s detail=%s", self._settings.worker_id, exc.code, exc)
            return
        assert isinstance(request, RequestChunks)
        await self._tasks.submit(request.session_id, lambda: self._credit(request, msg.headers))

    async def _credit(self, request: RequestChunks, headers: dict[str, str] | None) -> None:
        """After the session's earlier control messages and credits, beside other sessions' (a restore from host
        RAM or a rewind here must not hold up the rest)."""
        try:
            worker_chunk_traces.credited(request.session_id, headers)
            await self._engine.credit(request)
        except TurboServeError as exc:
            log.info("event=credit_refused worker=%s code=%s detail=%s", self._settings.worker_id, exc.code, exc)

    def heartbeat(self) -> WorkerHeartbeat:
        engine = self._engine
        return WorkerHeartbeat(
            worker_id=self._settings.worker_id, kind=self._settings.kind, model=self._settings.model,
            capacity=engine.realtime_capacity(self._settings.capacity) if self._settings.capacity_measured
            else self._settings.capacity,
            sessions=engine.chunks_produced(),
            active_sessions=sum(1 for s in engine.sessions.values() if s.next_seq <= s.credit_up_to),
            recent_batches=engine.drain_batch_samples(), started_at_s=self._started_at_s,
            offloaded=self._residency.offloaded() if self._residency is not None else (),
            state_bytes=dict(self._residency.state_bytes) if self._residency is not None else {},
            recent_restores=self._residency.drain_restore_samples() if self._residency is not None else (),
            draining=self._draining, node=self._settings.node,
        )

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            beat = self.heartbeat()
            offloaded = len(beat.offloaded)
            idle = max(0, len(beat.sessions) - beat.active_sessions - offloaded)  # a credited one may be offloaded
            set_sessions(beat.worker_id, {"active": beat.active_sessions, "idle": idle, "offloaded": offloaded})
            await self._nc.publish(subjects.SCHED_HEARTBEAT, encode(beat))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.heartbeat_interval_s):  # cancel-safe, unlike wait_for
                    await stop.wait()

    async def run(self, stop: asyncio.Event) -> None:
        worker_id = self._settings.worker_id
        # Each control message gets a consumer span linked to the sender's, so an attach, offload or migration
        # step shows up next to the scheduler decision that caused it (credits are traced per chunk).
        control = Endpoint("control", subjects.worker_control(worker_id), self._handle_control,
                           span_attributes={"worker.id": worker_id})
        service = await serve(self._nc, service="worker", description="chunk generation", endpoints=[control],
                              queue_group=f"worker-{worker_id}", log=log, tasks=self._tasks)
        credit = await self._nc.subscribe(subjects.worker_credit(worker_id), cb=self._on_credit)
        await self._nc.flush()
        log.info("event=worker_ready worker=%s model=%s", worker_id, self._settings.model)
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._engine.run(stop))
                tasks.create_task(self._heartbeat_loop(stop))
        finally:
            await credit.unsubscribe()
            await service.stop()
            if self._nc.is_connected:
                await self._nc.publish(subjects.SCHED_WORKER_GONE, encode(WorkerGone(worker_id=worker_id)))
                await self._nc.flush()
