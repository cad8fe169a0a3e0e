"""The scheduler's fleet metrics, read off the reports every scheduler already receives on NATS: live workers
(heartbeats within the worker timeout, minus those that said goodbye) and migrations with their pause.

It listens beside the coordinator instead of inside it, so the metrics cannot change a decision and the
decision code stays free of them; NATS delivers each report to every subscriber.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from services.common import subjects
from services.common.control import MigrationReport
from services.common.errors import ProtocolError
from services.common.messages import WorkerGone, WorkerHeartbeat
from services.common.telemetry.metrics import WORKERS, record_migration
from services.common.wire import decode

log = logging.getLogger("turboserve.telemetry")


class FleetGauges:
    """Workers heard from within ``worker_timeout_s``; pure bookkeeping, the clock injected."""

    def __init__(self, worker_timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._worker_timeout_s = worker_timeout_s
        self._clock = clock
        self._heard_s: dict[str, float] = {}

    def heartbeat(self, worker_id: str) -> None:
        self._heard_s[worker_id] = self._clock()

    def gone(self, worker_id: str) -> None:
        self._heard_s.pop(worker_id, None)

    def live_workers(self) -> int:
        oldest_s = self._clock() - self._worker_timeout_s
        return sum(1 for heard_s in self._heard_s.values() if heard_s >= oldest_s)


class FleetObserver:
    """Subscribes to heartbeats, goodbyes and migration reports and keeps the fleet series current."""

    def __init__(self, nats: NatsClient, worker_timeout_s: float) -> None:
        self._nats = nats
        self.gauges = FleetGauges(worker_timeout_s)
        WORKERS.set_function(self.gauges.live_workers)

    async def _on_heartbeat(self, msg: Msg) -> None:
        beat = self._decode(msg, WorkerHeartbeat)
        if isinstance(beat, WorkerHeartbeat):
            self.gauges.heartbeat(beat.worker_id)

    async def _on_gone(self, msg: Msg) -> None:
        notice = self._decode(msg, WorkerGone)
        if isinstance(notice, WorkerGone):
            self.gauges.gone(notice.worker_id)

    async def _on_migration(self, msg: Msg) -> None:
        report = self._decode(msg, MigrationReport)
        if isinstance(report, MigrationReport):
            record_migration(report.outcome, report.pause_ms / 1e3)

    @staticmethod
    def _decode(msg: Msg, kind: type[WorkerHeartbeat | WorkerGone | MigrationReport]) -> object:
        try:
            return decode(msg.data, expect=kind)
        except ProtocolError as exc:  # the coordinator logs bad reports; counting them twice helps nobody
            log.debug("event=fleet_report_unreadable subject=%s detail=%s", msg.subject, exc)
            return None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FleetObserver]:
        subscriptions = [
            await self._nats.subscribe(subjects.SCHED_HEARTBEAT, cb=self._on_heartbeat),
            await self._nats.subscribe(subjects.SCHED_WORKER_GONE, cb=self._on_gone),
            await self._nats.subscribe(subjects.SCHED_MIGRATION_REPORT, cb=self._on_migration),
        ]
        try:
            yield self
        finally:
            for subscription in subscriptions:
                if not self._nats.is_closed:
                    await subscription.unsubscribe()
