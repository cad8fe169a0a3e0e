"""actuation.StateMover: offload, and live migration whose ownership change is PostgreSQL's epoch bump; workers are
reached through a ``WorkerChannel`` (the runner's NATS), and migration reports come back through ``on_report``.

Migration follows the handshake in services.common.control. The commit order is what makes it safe: the source
has stopped the session and dropped it before it reports "copied"; only then is the epoch bumped (conditionally,
so a session that another decision moved meanwhile is left alone) and the new placement published. A session
whose state is offloaded has nothing live to copy: it moves by snapshot (epoch bump, and the target restores it
from the state store when the gateway attaches it there). A migration that ends without a report is undecided
(the source may have dropped the session already), so it is settled by placing the session on its source again
under a new epoch. A source found lost while the scheduler waits ends the wait at once: the one decider waits on each
migration, and a report that never comes would hold every decision (the lost worker's sessions' new homes among
them) for the whole report deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

from services.common.control import (
    MigrationReport,
    MigrationTicket,
    OffloadSession,
    PrepareMigration,
    StartMigration,
)
from services.common.errors import StaleEpoch
from services.common.messages import DetachSession, Placement, Reply, WorkerHeartbeat
from services.common.wire import Message
from services.scheduler.actuation import WorkerChannel
from services.scheduler.store.protocol import SchedulerStore

T = TypeVar("T")
log = logging.getLogger("turboserve.scheduler.state_mover")
MAX_PENDING_MIGRATIONS = 256


def _utc_now() -> datetime:
    return datetime.now(UTC)


class WorkerStateMover:
    """One per scheduler process; ``close`` gives up on the migrations still waiting for a report (idempotent)."""

    def __init__(
        self,
        channel: WorkerChannel,
        store: SchedulerStore,
        *,
        migration_timeout_s: float = 30.0,
        report_slack_s: float = 5.0,
        wall_clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._channel = channel
        self._store = store
        self._migration_timeout_s = migration_timeout_s
        self._report_timeout_s = migration_timeout_s + report_slack_s
        self._wall_clock = wall_clock
        self._pending: dict[tuple[str, int], asyncio.Future[MigrationReport]] = {}
        self._offloaded: dict[str, frozenset[str]] = {}
        self._losses: dict[str, asyncio.Event] = {}
        """Per worker that something waits on: set (and dropped) when it is lost, which ends those waits."""

    async def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()

    def worker_lost(self, worker_id: str) -> None:
        """The worker is lost or gone: what waits on it now (a request, a migration's report) ends as unanswered.
        Only the waits in flight: a later request to it is sent, and a dead worker's fails at once anyway."""
        loss = self._losses.pop(worker_id, None)
        if loss is not None:
            loss.set()

    async def _unless_lost(self, worker_id: str, wait: Awaitable[T]) -> T | None:
        """``wait``'s result, or None as soon as ``worker_id`` is lost (``wait`` is then cancelled)."""
        loss = self._losses.setdefault(worker_id, asyncio.Event())
        work, lost = asyncio.ensure_future(wait), asyncio.ensure_future(loss.wait())
        try:
            await asyncio.wait((work, lost), return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            work.cancel()  # a no-op once it is done
        return work.result() if work.done() and not work.cancelled() else None

    def observe(self, beat: WorkerHeartbeat) -> None:
        """Which sessions each worker holds offloaded: those move by snapshot, not by live transfer."""
        self._offloaded[beat.worker_id] = frozenset(beat.offloaded)

    def is_offloaded(self, session_id: str, worker_id: str) -> bool:
        return session_id in self._offloaded.get(worker_id, frozenset())

    async def offload(self, session_id: str, worker_id: str, epoch: int, reason: str) -> bool:
        answer = await self._request(worker_id, OffloadSession(session_id, epoch, reason))
        ok = isinstance(answer, Reply) and answer.ok
        log.info("decision=offload session=%s worker=%s ok=%s reason=%r detail=%r", session_id, worker_id, ok,
                 reason, getattr(answer, "detail", ""))
        if ok:
            self._offloaded[worker_id] = self._offloaded.get(worker_id, frozenset()) | {session_id}
        return ok

    async def migrate(self, session_id: str, source: str, target: str, epoch: int, reason: str) -> MigrationReport:
        if source == target:
            return _failed(session_id, epoch, source, target, "source and target are the same worker")
        if self.is_offloaded(session_id, source):
            report = MigrationReport(session_id, epoch, source, target, "copied", detail="offloaded: by snapshot")
        else:
            report = await self._live(session_id, source, target, epoch, reason)
        if report.outcome == "copied":
            report = await self._commit(report, reason)
        log.info("decision=migrate session=%s source=%s target=%s outcome=%s pause_ms=%.1f reason=%r detail=%r",
                 session_id, source, target, report.outcome, report.pause_ms, reason, report.detail)
        return report

    async def _live(self, session_id: str, source: str, target: str, epoch: int, reason: str) -> MigrationReport:
        key = (session_id, epoch)
        if key in self._pending or len(self._pending) >= MAX_PENDING_MIGRATIONS:
            return _failed(session_id, epoch, source, target, "a migration of this session is already running")
        prepare = PrepareMigration(session_id, epoch, source, timeout_s=self._migration_timeout_s)
        ticket = await self._request(target, prepare)
        if not isinstance(ticket, MigrationTicket):
            return _failed(session_id, epoch, source, target, f"target refused: {_detail(ticket)}")
        future: asyncio.Future[MigrationReport] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            start = StartMigration(session_id, epoch, target, ticket.host, ticket.port, reason)
            answer = await self._request(source, start)
            if not (isinstance(answer, Reply) and answer.ok):  # the target's deadline frees its reservation
                return _failed(session_id, epoch, source, target, f"source refused: {_detail(answer)}")
            try:
                report = await self._unless_lost(source, asyncio.wait_for(asyncio.shield(future),
                                                                          self._report_timeout_s))
            except TimeoutError:
                await self._reclaim(session_id, source, target, epoch)
                return _failed(session_id, epoch, source, target, "no report from the source in time")
            if report is None:  # its row still names the lost source: the next decision places it anew
                await self._request(target, DetachSession(session_id, epoch))
                return _failed(session_id, epoch, source, target, "the source was lost before it reported")
            return report
        finally:
            self._pending.pop(key, None)

    async def _commit(self, report: MigrationReport, reason: str) -> MigrationReport:
        """Move ownership: conditional epoch bump, placement for the gateway, then let the source forget it."""
        session_id, target = report.session_id, report.target_worker
        session = await self._store.get_session(session_id)
        try:
            if session is None or session.status == "closed":
                raise StaleEpoch(f"session {session_id} is gone or closed")
            moved = await self._store.move_session(
                session_id, expected_epoch=report.epoch, worker_id=target, status=session.status,
                at=self._wall_clock(),
            )
        except StaleEpoch as exc:  # another decision moved or closed it: the copy on the target is an orphan
            await self._request(target, DetachSession(session_id, report.epoch))
            return _failed(session_id, report.epoch, report.source_worker, target, f"not committed: {exc}")
        placement = Placement(session_id, target, moved.epoch, f"migrated: {reason}", moved.gateway_id or "")
        await self._channel.publish_placement(placement)
        await self._request(report.source_worker, DetachSession(session_id, report.epoch))
        self._offloaded[report.source_worker] = self._offloaded.get(report.source_worker, frozenset()) - {session_id}
        return report

    async def _reclaim(self, session_id: str, source: str, target: str, epoch: int) -> None:
        """No report: the source may or may not have dropped the session. Placing it on the source again under a
        new epoch settles both cases: the gateway re-attaches there, and the source either still holds the state
        or rebuilds it from the latest snapshot; the target's copy, if any, is dropped."""
        session = await self._store.get_session(session_id)
        if session is None or session.status == "closed":
            return
        try:
            moved = await self._store.move_session(
                session_id, expected_epoch=epoch, worker_id=source, status=session.status, at=self._wall_clock()
            )
        except StaleEpoch:
            return  # another decision already moved it
        placement = Placement(session_id, source, moved.epoch, "migration undecided: placed on its source again",
                              moved.gateway_id or "")
        await self._channel.publish_placement(placement)
        await self._request(target, DetachSession(session_id, epoch))

    def on_report(self, report: MigrationReport) -> None:
        """A source's report of how a migration ended, handed over by the runner."""
        future = self._pending.get((report.session_id, report.epoch))
        if future is None or future.done():
            log.info("event=report_unawaited session=%s outcome=%s", report.session_id, report.outcome)
            return
        future.set_result(report)

    async def _request(self, worker_id: str, request: Message) -> Message | None:
        """The worker's answer; None when it gave none (the channel logs that) or was lost meanwhile."""
        return await self._unless_lost(worker_id, self._channel.ask_worker(worker_id, request))


def _failed(session_id: str, epoch: int, source: str, target: str, detail: str) -> MigrationReport:
    return MigrationReport(session_id, epoch, source, target, "failed", detail=detail)


def _detail(answer: Message | None) -> str:
    if answer is None:
        return "no answer"
    if isinstance(answer, Reply):
        return f"{answer.code}: {answer.detail}"
    return f"unexpected {answer.TYPE}"
