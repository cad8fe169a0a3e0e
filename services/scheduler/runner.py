"""The scheduler's only NATS code: every subscription, every endpoint and every publish of the scheduler process.

Requests (open, update, the operator's migrate and offload) are answered in a queue group, so several schedulers
share them; reports (heartbeats, worker gone, migration reports) reach every scheduler and fan out here, once, to
whoever needs them: liveness, the control loop, the state mover. What the scheduler sends (control requests
to workers, placements to gateways, scale decisions) goes through ``SchedulerNats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import TypeVar, cast

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from services.common import subjects
from services.common.admin import MigrateSession, OffloadRequest
from services.common.control import DrainWorker, MigrationReport, ProbeWorker, ScaleDecision
from services.common.endpoints import Endpoint, Serving, serve
from services.common.errors import TurboServeError
from services.common.latest_per_key import LatestPerKey
from services.common.messages import (
    ClaimSession,
    DetachSession,
    GatewayLease,
    ListSessions,
    OpenSession,
    Placement,
    RecordPrompt,
    Reply,
    SessionClaim,
    UpdateSession,
    WorkerGone,
    WorkerHeartbeat,
)
from services.common.telemetry.db import traced_store
from services.common.telemetry.tracing import consumer_span
from services.common.wire import Message, decode, encode
from services.scheduler.control_loop import ControlLoop
from services.scheduler.control_runner import open_control_loop
from services.scheduler.control_settings import ControlSettings
from services.scheduler.leadership import Leadership, LeadershipLost
from services.scheduler.lifecycle import SessionLifecycle
from services.scheduler.liveness import WorkerLiveness
from services.scheduler.migrations import migrate
from services.scheduler.mobility import Mobility
from services.scheduler.settings import SchedulerSettings
from services.scheduler.state_mover import WorkerStateMover
from services.scheduler.store.postgres import PostgresStore
from services.state_store.client import SnapshotClient

log = logging.getLogger("turboserve.scheduler")

QUEUE_GROUP = "turboserve-scheduler"
BEATS_GRACE_S = 2.0
"""How long a closing scheduler lets the heartbeats it took finish recording."""
M = TypeVar("M", bound=Message)


class SchedulerNats:
    """Everything the scheduler sends: control requests to workers (the state mover's and the loop's drains),
    placements to gateways, scale decisions to an external provisioner."""

    def __init__(self, nats: NatsClient, *, request_timeout_s: float = 10.0, drain_timeout_s: float = 2.0,
                 probe_timeout_s: float = 0.5) -> None:
        self._nats = nats
        self._request_timeout_s = request_timeout_s
        self._drain_timeout_s = drain_timeout_s
        self._probe_timeout_s = probe_timeout_s

    async def ask_worker(self, worker_id: str, request: Message, timeout_s: float | None = None) -> Message | None:
        try:
            msg = await self._nats.request(subjects.worker_control(worker_id), encode(request),
                                           timeout=timeout_s or self._request_timeout_s)
            return decode(msg.data)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, TurboServeError) as exc:
            log.info("event=worker_request_failed worker=%s request=%s detail=%s", worker_id, request.TYPE, exc)
            return None

    async def probe(self, worker_id: str) -> bool | None:
        """True: the worker answered; False: nobody listens on its control subject (its process is gone);
        None: no answer in time (frozen, overloaded or cut off: only its heartbeat timeout can tell)."""
        try:
            await self._nats.request(subjects.worker_control(worker_id), encode(ProbeWorker(worker_id)),
                                     timeout=self._probe_timeout_s)
        except nats.errors.NoRespondersError:
            return False
        except nats.errors.TimeoutError:
            return None
        return True

    async def publish_placement(self, placement: Placement) -> None:
        await self._nats.publish(subjects.placement(placement.session_id), encode(placement))

    async def release(self, worker_id: str, session_id: str, epoch: int) -> None:
        answer = await self.ask_worker(worker_id, DetachSession(session_id, epoch), self._drain_timeout_s)
        if isinstance(answer, Reply) and not answer.ok:
            log.info("event=release_refused worker=%s session=%s detail=%s", worker_id, session_id, answer.detail)

    async def publish_scale(self, decision: ScaleDecision) -> None:
        await self._nats.publish(subjects.SCHED_SCALE, encode(decision))

    async def drain(self, worker_id: str, reason: str) -> str:
        """The scheduler's own drain set is what keeps placements off the worker; the worker's answer is only
        logged (a worker that does not know DrainWorker refuses it, and is drained all the same)."""
        answer = await self.ask_worker(worker_id, DrainWorker(worker_id, reason), self._drain_timeout_s)
        if answer is None:
            return "no answer"
        if isinstance(answer, Reply):
            return "ok" if answer.ok else f"{answer.code}: {answer.detail}"
        return f"unexpected {answer.TYPE}"


class SchedulerRunner:
    """Subscriptions and the periodic liveness sweep of one scheduler; entering it means it is serving, leaving
    it unsubscribes and stops the sweep (``close`` is idempotent)."""

    def __init__(
        self, nats: NatsClient, *, lifecycle: SessionLifecycle, liveness: WorkerLiveness, loop: ControlLoop,
        mover: WorkerStateMover, mobility: Mobility, out: SchedulerNats, sweep_interval_s: float,
    ) -> None:
        self._nats = nats
        self._out = out
        self._lifecycle = lifecycle
        self._liveness = liveness
        self._loop = loop
        self._mover = mover
        self._mobility = mobility
        self._background: set[asyncio.Task[None]] = set()
        self._beats = LatestPerKey("heartbeats")
        self._sweep_interval_s = sweep_interval_s
        self._subscriptions: list[Subscription] = []
        self._service: Serving | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SchedulerRunner:
        await self._liveness.start()
        endpoints = [
            Endpoint.typed("open", subjects.SCHED_OPEN, OpenSession, self._lifecycle.open),
            Endpoint.typed("update", subjects.SCHED_UPDATE, UpdateSession, self._update),
            Endpoint.typed("claim", subjects.SCHED_CLAIM, ClaimSession, self._claim),
            Endpoint.typed("prompt", subjects.SCHED_PROMPT, RecordPrompt, self._lifecycle.record_prompt),
            Endpoint.typed("list", subjects.SCHED_LIST, ListSessions, self._lifecycle.list_for_owner),
            Endpoint.typed("migrate", subjects.SCHED_ADMIN_MIGRATE, MigrateSession, self._mobility.migrate),
            Endpoint.typed("offload", subjects.SCHED_ADMIN_OFFLOAD, OffloadRequest, self._mobility.offload),
        ]
        self._service = await serve(self._nats, service="scheduler", description="session placement",
                                    endpoints=endpoints, queue_group=QUEUE_GROUP, log=log)
        self._subscriptions = [
            await self._nats.subscribe(subjects.SCHED_HEARTBEAT, cb=self._on_heartbeat),
            await self._nats.subscribe(subjects.SCHED_WORKER_GONE, cb=self._on_worker_gone),
            await self._nats.subscribe(subjects.SCHED_MIGRATION_REPORT, cb=self._on_migration_report),
            await self._nats.subscribe(subjects.SCHED_GATEWAY_LEASE, cb=self._on_gateway_lease),
        ]
        await self._nats.flush()  # the server has the subscriptions once this returns: we are serving
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="scheduler-sweep")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        service, self._service = self._service, None
        if service is not None and not self._nats.is_closed:
            await service.stop()
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            if not self._nats.is_closed:
                await subscription.unsubscribe()
        await self._beats.close(grace_s=BEATS_GRACE_S)
        background, self._background = list(self._background), set()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)

    async def _claim(self, request: ClaimSession) -> SessionClaim:
        """Claim, then tell the gateway that held the session: a placement with no worker, naming the new gateway,
        which makes the old one drop its copy and stop receiving the session's chunks."""
        claim = await self._lifecycle.claim(request)
        await self._out.publish_placement(
            Placement(claim.session_id, "", claim.epoch, "claimed by another gateway", request.gateway_id))
        return claim

    async def _update(self, request: UpdateSession) -> Placement | Reply:
        answer = await self._lifecycle.update(request)
        if request.status == "closed":  # off the reply's path: the state store may lag
            task = asyncio.create_task(self._mobility.session_updated(request), name="snapshot-close")
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return answer

    async def _on_heartbeat(self, msg: Msg) -> None:
        """The one heartbeat fan-out. Its arrival restarts the worker's timeout at once; the rows and chunk counts,
        the loop's view and cost models and the mover follow in the background, for the newest beat of each
        worker at a time (each states the whole worker; a skipped one's latency samples are followed by more).
        So beats never queue behind the database, where a slow one once made live workers look silent."""
        async def record(beat: WorkerHeartbeat) -> None:
            await self._liveness.record(beat)
            self._loop.observe_heartbeat(beat)
            self._mover.observe(beat)

        async def take(beat: WorkerHeartbeat) -> None:
            self._liveness.heard_from(beat)
            self._beats.submit(beat.worker_id, lambda: self._reported(msg, WorkerHeartbeat, lambda: record(beat)))

        await self._consume(msg, WorkerHeartbeat, take)

    async def _on_worker_gone(self, msg: Msg) -> None:
        async def handle(notice: WorkerGone) -> None:
            self._mover.worker_lost(notice.worker_id)
            if await self._liveness.worker_gone(notice):
                self._loop.trigger("worker_gone")

        await self._consume(msg, WorkerGone, handle)

    async def _on_gateway_lease(self, msg: Msg) -> None:
        await self._consume(msg, GatewayLease, self._lifecycle.renew_leases)

    async def _on_migration_report(self, msg: Msg) -> None:
        async def handle(report: MigrationReport) -> None:
            self._mover.on_report(report)

        await self._consume(msg, MigrationReport, handle)

    async def _consume(self, msg: Msg, kind: type[M], handle: Callable[[M], Awaitable[None]]) -> None:
        await self._reported(msg, kind, lambda: handle(cast(M, decode(msg.data, expect=kind))))

    async def _reported(self, msg: Msg, kind: type[Message], work: Callable[[], Awaitable[None]]) -> None:
        """Reports have nobody to answer to: a bad one is logged and dropped, the next one may be good."""
        try:
            with consumer_span(f"scheduler.{kind.TYPE}", msg.headers):
                await work()
        except asyncio.CancelledError:
            raise
        except TurboServeError as exc:
            log.warning("event=report_dropped subject=%s code=%s detail=%r", msg.subject, exc.code, str(exc))
        except Exception:
            log.exception("event=report_failed subject=%s", msg.subject)

    async def _sweep_forever(self) -> None:
        """Silence past the timeout makes a worker lost, a scheduling event; a failed sweep (database down) is
        logged and the next one retries."""
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            try:
                lost = await self._liveness.sweep()
                lost += await self._probe_late_workers()
            except asyncio.CancelledError:
                raise
            except TurboServeError as exc:
                log.warning("event=sweep_failed code=%s detail=%r", exc.code, str(exc))
                continue
            except Exception:
                log.exception("event=sweep_failed")
                continue
            for worker_id in lost:  # first: a decision may be waiting on one of them
                self._mover.worker_lost(worker_id)
            if lost:
                self._loop.trigger("worker_lost")


    async def _probe_late_workers(self) -> list[str]:
        late = self._liveness.late()
        answers = await asyncio.gather(*(self._out.probe(worker_id) for worker_id in late))
        lost = []
        for worker_id, answer in zip(late, answers, strict=True):
            if answer is False and await self._liveness.lose(
                worker_id, "its heartbeat is late and nobody listens on its control subject: the process is gone"
            ):
                lost.append(worker_id)
        return lost


@contextlib.asynccontextmanager
async def open_scheduler(settings: SchedulerSettings, nats: NatsClient,
                         leadership: Leadership | None = None) -> AsyncIterator[SchedulerRunner]:
    """Migrate the schema, then serve on ``nats`` until the block exits; serving once this yields. With
    ``leadership`` (held), every decision first confirms it."""
    await migrate(settings.database_url)
    async with contextlib.AsyncExitStack() as stack:
        store = traced_store(PostgresStore.connect(settings.database_url))
        stack.push_async_callback(store.close)
        out = SchedulerNats(nats)
        mover = WorkerStateMover(out, store)  # the StateMover the control loop acts through
        stack.push_async_callback(mover.close)
        liveness = WorkerLiveness(store, worker_timeout_s=settings.worker_timeout_s)
        loop = await stack.enter_async_context(open_control_loop(
            ControlSettings.from_env(), out, store, mover, liveness, offload_after_s=settings.offload_after_s,
            linger_s=settings.linger_s, confirm_lead=None if leadership is None else leadership.confirm,
        ))
        yield await stack.enter_async_context(SchedulerRunner(
            nats, lifecycle=SessionLifecycle(store, loop), liveness=liveness, loop=loop, mover=mover,
            mobility=Mobility(store, mover, SnapshotClient(nats), loop), out=out,
            sweep_interval_s=settings.sweep_interval_s,
        ))


async def run_scheduler(settings: SchedulerSettings, nats: NatsClient, stop: asyncio.Event) -> None:
    """Stand by until this scheduler leads, then serve until ``stop`` is set (the entry point for ``turboserve
    scheduler`` and ``turboserve up``). Raises LeadershipLost once deposed: the process exits and is started again,
    as a standby."""
    leadership = Leadership(settings.database_url)
    try:
        if not await leadership.acquire(stop):
            return
        async with open_scheduler(settings, nats, leadership):
            log.info("event=serving worker_timeout_s=%s sweep_s=%s", settings.worker_timeout_s,
                     settings.sweep_interval_s)
            ends = (asyncio.create_task(stop.wait()), asyncio.create_task(leadership.lost.wait()))
            try:
                await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for end in ends:
                    end.cancel()
        if leadership.lost.is_set():
            raise LeadershipLost("another scheduler leads now; this one stops serving")
    finally:
        await leadership.close()
