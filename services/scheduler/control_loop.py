"""The live closed loop: on every scheduling event and at least every control period, build the snapshot from
PostgreSQL and this process's knowledge, ask the policy for a plan, and carry the plan out in its order.

Deciding is the policy's (services/scheduler/policy, the code the simulator runs); this module only translates
actions into the conditional placement path, the StateMover and the Provisioner. Invariants it keeps:
- every write about a session is conditional on the epoch it read, so a plan made on a stale snapshot loses
  to the newer decision instead of overwriting it;
- a worker is removed only when PostgreSQL shows no open session on it: active sessions were migrated by the
  plan, idle ones' state is moved here (live, or by snapshot when offloaded) before the provisioner stops it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Protocol

from services.common.control import MigrationReport
from services.common.errors import StaleEpoch, TurboServeError
from services.common.messages import Placement, WorkerHeartbeat
from services.common.telemetry.metrics import record_scale_event
from services.common.telemetry.tracing import consumer_span, record_decision
from services.scheduler.actuation import Provisioner, StateMover
from services.scheduler.cluster_view import ClusterView, sync
from services.scheduler.coordinator import log_decision, utc_now
from services.scheduler.placement import PlacementChoice, WorkerLoad
from services.scheduler.policy import (
    Action,
    AddGpus,
    ClosedLoopController,
    ClusterSnapshot,
    DrainGpu,
    GpuView,
    Migrate,
    Offload,
    Place,
    Plan,
    RemoveGpu,
    Restore,
    SessionView,
)
from services.scheduler.policy.cost_models import CostModelError
from services.scheduler.policy.workspace import Workspace
from services.scheduler.store.protocol import SchedulerStore, SessionRecord

log = logging.getLogger("turboserve.scheduler.control")
MAX_PENDING_EVENTS = 64
DECISION_HISTORY = 4096


class LoopIO(Protocol):
    """The two messages the loop sends itself; the runner implements them over NATS."""

    async def publish_placement(self, placement: Placement) -> None: ...

    async def drain(self, worker_id: str, reason: str) -> str:
        """Tell a worker it is being drained; returns its answer in words, for the log."""
        ...


class ControlLoop:
    """One per scheduler process. ``place`` is the Coordinator's placement rule (open, resume, re-homing);
    ``trigger`` marks a scheduling event; ``run`` decides until cancelled."""

    def __init__(
        self,
        store: SchedulerStore,
        controller: ClosedLoopController,
        mover: StateMover,
        provisioner: Provisioner,
        io: LoopIO,
        *,
        control_period_s: float,
        provision_timeout_s: float,
        retire_grace_s: float,
        max_gpus: int,
        offload_after_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        timer: Callable[[], float] = time.perf_counter,
        wall_clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._store = store
        self.controller = controller
        self._mover = mover
        self._provisioner = provisioner
        self._io = io
        self._period_s = control_period_s
        self._provision_timeout_s = provision_timeout_s
        self._retire_grace_s = retire_grace_s
        self._max_gpus = max_gpus
        self._offload_after_s = offload_after_s
        self._clock = clock
        self._timer = timer
        self._wall_clock = wall_clock
        kinds = controller.models.latency.kinds
        self.view = ClusterView(kinds, controller.config.scale_kind, controller.capacity)
        self.snapshot = ClusterSnapshot()
        self.decide_ms: deque[float] = deque(maxlen=DECISION_HISTORY)
        self._events: set[str] = set()
        self._wake = asyncio.Event()

    # --- inputs -----------------------------------------------------------------------------------------

    def trigger(self, event: str) -> None:
        """A scheduling event (open, resume, pause, close, worker joined or lost): decide soon. Events that
        arrive while a plan runs coalesce into the next decision."""
        if len(self._events) < MAX_PENDING_EVENTS:
            self._events.add(event)
        self._wake.set()

    def observe_heartbeat(self, beat: WorkerHeartbeat) -> None:
        """Offloaded sets and state sizes for the snapshot; measured (batch, latency) and restore samples for the
        cost models."""
        if self.view.observe(beat, self._clock()):
            self.trigger("worker_joined")
        kind = self.view.kind_of[beat.worker_id]
        for sessions, latency_ms in beat.recent_batches:
            try:
                self.controller.observe_chunk(kind, sessions, latency_ms)
            except CostModelError as exc:
                log.info("event=sample_dropped worker=%s detail=%s", beat.worker_id, exc)
        for state_bytes, elapsed_ms in beat.recent_restores:
            try:
                self.controller.observe_restore(state_bytes, elapsed_ms)
            except CostModelError as exc:
                log.info("event=sample_dropped worker=%s detail=%s", beat.worker_id, exc)

    def observe_migration(self, report: MigrationReport) -> None:
        if report.outcome == "copied" and report.state_bytes > 0:
            self.controller.observe_migration(report.state_bytes, report.pause_ms or report.transfer_ms)

    def place(self, workers: Iterable[WorkerLoad], *, model: str) -> PlacementChoice:
        """The controller's placement rule on the coordinator's view of load, for answering open and resume at
        once: the full decision (rebalance, scaling) follows as the event's plan."""
        now_s = self._clock()
        gpus = [
            w for w in workers
            if w.live and w.model == model and not w.draining and w.worker_id not in self.view.draining
            and w.worker_id not in self.view.retired
        ]
        if not gpus:
            return PlacementChoice(None, None, f"no live worker serves model {model!r} outside a drain")
        snapshot = ClusterSnapshot.build(
            (SessionView(f"{w.worker_id}/{i}", 0, True, w.worker_id)
             for w in gpus for i in range(min(w.active_sessions, w.capacity))),
            (GpuView(w.worker_id, self.view.kind_of.get(w.worker_id, self.view.scale_kind), w.capacity, 0.0)
             for w in gpus),
        )
        workspace = Workspace(snapshot, self.controller.models.latency, now_s)
        choice = self.controller.placement.choose(workspace, SessionView("new", 0, True, None), 0.0)
        if choice is None:
            return PlacementChoice(None, None, f"all {len(gpus)} live workers of model {model!r} are full")
        return PlacementChoice(choice[0], None, f"{self.controller.name} placement: {choice[1]}")

    # --- the loop ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Decide on every event, or after a quiet control period; a failed round is logged and retried."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._period_s)
            except TimeoutError:
                pass
            self._wake.clear()
            events, self._events = self._events, set()
            trigger = ",".join(sorted(events)) or "period"
            try:
                with consumer_span("scheduler.plan", None, trigger=trigger):
                    await self.step(trigger)
            except asyncio.CancelledError:
                raise
            except TurboServeError as exc:
                log.warning("event=control_round_failed code=%s detail=%r", exc.code, str(exc))
            except Exception:
                log.exception("event=control_round_failed")

    async def step(self, trigger: str) -> Plan:
        """One decision: snapshot, decide (timed), execute in plan order."""
        started = self._timer()
        now_s = self._clock()
        await self._expire_pending(now_s)
        rows = await self._store.list_sessions()
        self.view.forget_closed({row.session_id for row in rows})
        gpus = self.view.gpu_views(await self._store.list_workers())
        self.snapshot = sync(self.snapshot, self.view.session_views(rows, gpus), gpus)
        decide_started = self._timer()
        plan = self.controller.decide(self.snapshot, now_s)
        decide_ms = (self._timer() - decide_started) * 1000
        self.decide_ms.append(decide_ms)
        for action in plan.actions:  # before any await: placement must stop choosing a worker being drained
            if isinstance(action, DrainGpu):
                self.view.draining.add(action.gpu_id)
        quiet = trigger == "period" and not plan.actions  # a periodic round that changed nothing: debug only
        log.log(logging.DEBUG if quiet else logging.INFO,
                "event=plan trigger=%s decide_ms=%.3f snapshot_ms=%.1f sessions=%d gpus=%d level=%s "
                "bottleneck_ms=%.0f target_gpus=%d actions=%d", trigger, decide_ms,
                (decide_started - started) * 1000, len(self.snapshot.sessions), len(self.snapshot.gpus),
                plan.level, plan.bottleneck_ms, plan.target_gpus, len(plan.actions))
        for action in plan.actions:
            try:
                await self._execute(action, now_s)
            except TurboServeError as exc:  # one refused action (a provisioner error, a lost row) is not the plan
                log.warning("event=action_failed action=%s code=%s detail=%r", type(action).__name__, exc.code,
                            str(exc))
        return plan

    async def _execute(self, action: Action, now_s: float) -> None:
        if isinstance(action, Offload):
            await self._offload(action)
        elif isinstance(action, (Place, Restore)):
            await self._place(action.session_id, action.gpu_id, action.reason)
        elif isinstance(action, Migrate):
            await self._migrate(action.session_id, action.source_gpu_id, action.target_gpu_id, action.reason)
        elif isinstance(action, AddGpus):
            await self._add(action, now_s)
        elif isinstance(action, DrainGpu):
            answer = await self._io.drain(action.gpu_id, action.reason)
            log.info("decision=drain worker=%s reason=%r answer=%r", action.gpu_id, action.reason, answer)
        else:
            await self._remove(action, now_s)

    async def _open_row(self, session_id: str) -> SessionRecord | None:
        row = await self._store.get_session(session_id)
        return row if row is not None and row.status != "closed" else None

    async def _offload(self, action: Offload) -> None:
        row = await self._open_row(action.session_id)
        if row is None or row.status != "idle" or row.worker_id != action.gpu_id:
            return
        quiet_s = (self._wall_clock() - row.updated_at).total_seconds()
        if quiet_s < self._offload_after_s:  # a pause this fresh is often a quick pause-resume: keep the slot
            log.info("event=offload_deferred session=%s worker=%s quiet_s=%.1f offload_after_s=%.1f",
                     row.session_id, action.gpu_id, quiet_s, self._offload_after_s)
            return
        if await self._mover.offload(row.session_id, action.gpu_id, row.epoch, action.reason):
            self.view.mark_offloaded(action.gpu_id, row.session_id)

    async def _place(self, session_id: str, gpu_id: str, reason: str) -> None:
        """A session with no live state goes through the conditional placement path (epoch bump, Placement
        to the gateway); one whose state sits on another live worker moves there with the StateMover."""
        row = await self._open_row(session_id)
        if row is None or row.worker_id == gpu_id:
            return
        if row.worker_id is not None and row.worker_id in self.snapshot.gpus:
            await self._migrate(session_id, row.worker_id, gpu_id, reason)
            return
        try:
            moved = await self._store.move_session(session_id, expected_epoch=row.epoch, worker_id=gpu_id,
                                                   status=row.status, at=self._wall_clock())
        except StaleEpoch as exc:
            log_decision("skip", session_id, f"moved by another decision: {exc}")
            return
        log_decision("place", session_id, reason, worker=gpu_id, epoch=moved.epoch)
        await self._io.publish_placement(Placement(session_id, gpu_id, moved.epoch, reason))

    async def _migrate(self, session_id: str, source: str, target: str, reason: str) -> bool:
        row = await self._open_row(session_id)
        if row is None or row.worker_id != source:
            return True  # closed, or already elsewhere: nothing of it is left on the source
        report = await self._mover.migrate(session_id, source, target, row.epoch, reason)
        self.observe_migration(report)
        if report.outcome == "copied":
            self.view.migrated_at[session_id] = self._clock()
            return True
        return False

    async def _add(self, action: AddGpus, now_s: float) -> None:
        room = self._max_gpus - len(self.snapshot.gpus)
        count = min(action.count, room)
        if count <= 0:
            log.info("decision=add_gpus count=0 reason=%r: already at max_gpus=%d", action.reason, self._max_gpus)
            return
        ids = await self._provisioner.scale_out(count, action.reason)
        record_scale_event("out", count)
        added = self.view.add_pending(ids, count, now_s)
        log.info("decision=add_gpus count=%d workers=%s kind=%s reason=%r", count, ",".join(added), action.kind,
                 action.reason)
        record_decision("add_gpus", action.reason, count=count, workers=",".join(added), kind=action.kind)

    async def _remove(self, action: RemoveGpu, now_s: float) -> None:
        worker_id = action.gpu_id
        if worker_id not in self.view.pending and not await self._emptied(worker_id, action.reason):
            return
        await self._provisioner.remove(worker_id, action.reason)
        record_scale_event("in")
        self.view.pending.pop(worker_id, None)
        self.view.draining.discard(worker_id)
        self.view.retired[worker_id] = now_s + self._retire_grace_s
        log.info("decision=remove_gpu worker=%s reason=%r", worker_id, action.reason)
        record_decision("remove_gpu", action.reason, worker=worker_id)

    async def _emptied(self, worker_id: str, reason: str) -> bool:
        """True when no open session is left on the worker; idle sessions' state is moved off it here (live,
        or by snapshot when offloaded), active ones must have been migrated by a plan."""
        left = [s for s in await self._store.list_sessions() if s.worker_id == worker_id]
        if any(s.status == "active" for s in left):
            log.info("event=remove_deferred worker=%s active=%d reason='active sessions still on it'", worker_id,
                     sum(s.status == "active" for s in left))
            return False
        targets = sorted((len(self.snapshot.residents[g]), g) for g, gpu in self.snapshot.gpus.items()
                         if g != worker_id and gpu.ready_at_s == 0.0 and g not in self.view.draining)
        if left and not targets:
            log.info("event=remove_deferred worker=%s reason='no worker to take its idle sessions'", worker_id)
            return False
        moved = [await self._migrate(s.session_id, worker_id, targets[0][1], f"{reason}: move idle state")
                 for s in left]
        return all(moved)

    async def _expire_pending(self, now_s: float) -> None:
        for worker_id, asked_s in list(self.view.pending.items()):
            if now_s - asked_s < self._provision_timeout_s:
                continue
            reason = f"asked for {now_s - asked_s:.0f} s ago and never heart-beat"
            del self.view.pending[worker_id]
            try:
                await self._provisioner.remove(worker_id, reason)
            except TurboServeError as exc:
                log.warning("event=pending_cancel_failed worker=%s detail=%s", worker_id, exc)
            log.info("decision=give_up_gpu worker=%s reason=%r", worker_id, reason)
