"""The scheduler's only decider: on every scheduling event and at least every control period, build the snapshot
from PostgreSQL and this process's knowledge, ask the policy for a plan, and carry the plan out in its order.

Deciding is the policy's (services/scheduler/policy, the code the simulator runs); this module translates actions
into the conditional placement path, the StateMover and the Provisioner, and answers the requests that wait for a
decision (open, resume). Invariants it keeps:
- every write about a session is conditional on the epoch it read, so a plan made on a stale snapshot loses
  to the newer decision instead of overwriting it; decisions of one process never overlap;
- a worker is removed only when PostgreSQL shows no open session on it: active sessions were migrated by the
  plan, idle ones' state is moved here (live, or by snapshot when offloaded) before the provisioner stops it;
- a session whose gateway stopped renewing its lease is closed once the linger ran out too, and its worker told;
- a worker asked for is in the store from the moment the provisioner took the ask until it is given back, so a
  scheduler that restarts waits for the ones still starting instead of asking again; what the policy learnt of
  the load is stored every ``learnt_every_s``, so it sizes from that and not from its priors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from opentelemetry.trace import Link

from services.common.control import MigrationReport
from services.common.errors import StaleEpoch, TurboServeError, Unavailable
from services.common.messages import Placement, WorkerHeartbeat
from services.common.telemetry.metrics import record_scale_event
from services.common.telemetry.tracing import linked_span, record_decision, request_links
from services.scheduler.actuation import Provisioner, StateMover
from services.scheduler.cluster_view import ClusterView, sync
from services.scheduler.liveness import WorkerLiveness, utc_now
from services.scheduler.policy import (
    Action,
    AddGpus,
    ClosedLoopController,
    ClusterSnapshot,
    DrainGpu,
    Migrate,
    Offload,
    Place,
    Plan,
    RemoveGpu,
    Restore,
    SessionView,
)
from services.scheduler.policy.controller import LearntStateError
from services.scheduler.policy.cost_models import CostModelError
from services.scheduler.policy.workspace import Workspace
from services.scheduler.store.protocol import SchedulerStore, SessionRecord

log = logging.getLogger("turboserve.scheduler.control")
MAX_PENDING_EVENTS = 64
DECISION_HISTORY = 4096


def log_decision(
    decision: str, session_id: str, reason: str, *, links: Sequence[Link] | None = None, **fields: object
) -> None:
    """Log the decision and record it as a span carrying its reason (STYLE habit 3)."""
    extra = "".join(f" {name}={value}" for name, value in fields.items())
    log.info("decision=%s session=%s%s reason=%r", decision, session_id, extra, reason)
    record_decision(decision, reason, session_id=session_id, links=links, **fields)


def workers_needed(action: Action) -> tuple[str, ...]:
    """The workers an action talks to (removing a worker needs nothing of it)."""
    if isinstance(action, Migrate):
        return (action.source_gpu_id, action.target_gpu_id)
    if isinstance(action, (Place, Restore, Offload, DrainGpu)):
        return (action.gpu_id,)
    return ()


class LoopIO(Protocol):
    """The messages the loop sends itself; the runner implements them over NATS."""

    async def publish_placement(self, placement: Placement) -> None: ...

    async def release(self, worker_id: str, session_id: str, epoch: int) -> None:
        """Tell a worker to drop a closed session's state (best effort: a worker that does not answer is lost
        or restarting, and holds nothing for it afterwards)."""
        ...

    async def drain(self, worker_id: str, reason: str) -> str:
        """Tell a worker it is being drained; returns its answer in words, for the log."""
        ...


@dataclass(slots=True)
class _Waiter:
    """A request waiting for the first decision that began after round ``since_round``."""

    answer: asyncio.Future[Placement | None]
    since_round: int
    links: tuple[Link, ...]
    """The request's trace: the round that answers links to it, and so does the decision made for it."""


class ControlLoop:
    """One per scheduler process and the scheduler's only decider: ``trigger`` marks a scheduling event,
    ``decide_for`` waits for the decision on one session, ``run`` decides until cancelled."""

    def __init__(
        self,
        store: SchedulerStore,
        controller: ClosedLoopController,
        mover: StateMover,
        provisioner: Provisioner,
        io: LoopIO,
        liveness: WorkerLiveness,
        *,
        control_period_s: float,
        provision_timeout_s: float,
        retire_grace_s: float,
        max_gpus: int,
        offload_after_s: float = 0.0,
        linger_s: float = 60.0,
        decision_timeout_s: float = 10.0,
        learnt_every_s: float = 30.0,
        confirm_lead: Callable[[], Awaitable[None]] | None = None,
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
        self._decision_timeout_s = decision_timeout_s
        self._learnt_every_s = learnt_every_s
        self._learnt_kept_s: float | None = None
        self._parked_known = False
        self._confirm_lead = confirm_lead
        self._linger_s = linger_s
        self.liveness = liveness
        self._clock = clock
        self._timer = timer
        self._wall_clock = wall_clock
        kinds = controller.models.latency.kinds
        self.view = ClusterView(kinds, controller.config.scale_kind, controller.capacity,
                                controller.config.overflow_slots)
        self.snapshot = ClusterSnapshot()
        self.decide_ms: deque[float] = deque(maxlen=DECISION_HISTORY)
        self._events: set[str] = set()
        self._wake = asyncio.Event()
        self._waiters: dict[str, _Waiter] = {}
        self._deciding = asyncio.Lock()
        self._rounds_started = 0
        self._worker_status: dict[str, str] = {}
        self._recorded_asks: dict[str, float] | None = None  # as last written to the store; None: not read yet

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
        """The model prices the whole transfer (it holds up both workers' batches), so the transfer time is what
        it learns from; the pause alone only where a report has no transfer time."""
        if report.outcome == "copied" and report.state_bytes > 0:
            node = self.view.node_of.get(report.source_worker, "")
            same_node = bool(node) and node == self.view.node_of.get(report.target_worker)
            self.controller.observe_migration(report.state_bytes, report.transfer_ms or report.pause_ms, same_node)

    # --- answers for requests ---------------------------------------------------------------------------

    async def decide_for(self, session_id: str, event: str) -> Placement | None:
        """Ask for a decision that sees ``session_id``'s current row and wait for it: the placement it made for
        the session, or None when it made none (already placed, or no room). Requests that arrive while a
        decision runs share the next one. Bounded: past ``decision_timeout_s`` it is Unavailable."""
        waiter = self._waiters.get(session_id)
        if waiter is None or waiter.answer.done():
            waiter = _Waiter(asyncio.get_running_loop().create_future(), self._rounds_started, request_links())
            self._waiters[session_id] = waiter
        self.trigger(event)
        try:
            async with asyncio.timeout(self._decision_timeout_s):
                return await asyncio.shield(waiter.answer)  # shared: one caller's cancel is not the others'
        except TimeoutError:
            raise Unavailable(f"the scheduler made no decision within {self._decision_timeout_s:.0f} s") from None

    def unplaced_reason(self, model: str) -> str:
        """Why the last decision could not place a session of ``model``, in words a refusal can carry."""
        serving = [g for g in self.snapshot.gpus.values() if g.model == model and g.ready_at_s == 0.0]
        if not serving:
            return f"no live worker serves model {model!r}"
        return f"all {len(serving)} live workers of model {model!r} are full or draining"

    def migration_target(self, session_id: str, source: str, model: str) -> str:
        """Where the policy's placement rule would put a session of ``model`` leaving ``source`` (an operator's
        migrate without a target), on the latest snapshot with ``source`` excluded."""
        workspace = Workspace(self.snapshot, self.controller.models.latency, self._clock())
        workspace.draining.update(g for g in (source, *self.view.retired) if g in self.snapshot.gpus)
        leaving = SessionView(session_id, self.view.state_bytes.get(session_id, 0), True, None, model=model)
        choice = self.controller.placement.choose(workspace, leaving, None)
        if choice is None:
            raise Unavailable(f"no other live worker of model {model!r} to move to")
        return choice[0]

    # --- the loop ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Decide on every event, or after a quiet control period; a failed round is logged and retried."""
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancel that lands as the event fires,
            # and the loop would then outlive its scheduler by a whole period.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._quiet_wait_s()):
                    await self._wake.wait()
            self._wake.clear()
            events, self._events = self._events, set()
            trigger = ",".join(sorted(events)) or "period"
            try:
                waiting = tuple(dict.fromkeys(link for w in self._waiters.values() for link in w.links))
                with linked_span("scheduler.plan", waiting, trigger=trigger):
                    await self.step(trigger)
            except asyncio.CancelledError:
                raise
            except TurboServeError as exc:
                log.warning("event=control_round_failed code=%s detail=%r", exc.code, str(exc))
            except Exception:
                log.exception("event=control_round_failed")

    def _quiet_wait_s(self) -> float:
        """How long the loop sleeps without an event: the control period, or less when a waiting session comes
        due for an overflow slot sooner. The simulator decides at that instant, and the overflow wait was chosen
        there; a loop that noticed a period later would keep a newcomer's first frame waiting up to 2 s longer."""
        config = self.controller.config
        if not config.overflow_slots:
            return self._period_s
        now_s = self._clock()
        dues = (since_s + config.overflow_after_s - now_s for since_s in self.view.waiting_since.values())
        return min((self._period_s, *(due_s for due_s in dues if due_s > 0)))

    async def step(self, trigger: str) -> Plan:
        """One decision: snapshot, decide (timed), execute in plan order, unplace what lost its worker. Every
        request that was waiting before it began gets its answer when it ends, placed or not. Decisions never
        overlap, whoever calls."""
        async with self._deciding:
            self._rounds_started += 1
            this_round = self._rounds_started
            try:
                return await self._decide_and_act(trigger)
            finally:
                for session_id in [s for s, w in self._waiters.items() if w.since_round < this_round]:
                    self._answer(session_id, None)

    async def _decide_and_act(self, trigger: str) -> Plan:
        started = self._timer()
        if self._confirm_lead is not None:  # one decider: a deposed scheduler must not act on a plan
            await self._confirm_lead()
        now_s = self._clock()
        if self._recorded_asks is None:
            await self.recover()
        if not self._parked_known:
            await self._keep_parked_out()
        await self._expire_pending(now_s)
        rows = await self._close_abandoned(await self._store.list_sessions())
        self.view.forget_closed({row.session_id for row in rows})
        workers = await self._store.list_workers()
        self._worker_status = {w.worker_id: w.status for w in workers}
        self.view.forget_gone(workers)
        heard = frozenset(self.liveness.heard)
        gpus = self.view.gpu_views(workers, heard)
        self.snapshot = sync(self.snapshot, self.view.session_views(rows, gpus, now_s, self._wall_clock()), gpus)
        decide_started = self._timer()
        plan = self.controller.decide(self.snapshot, now_s)
        decide_ms = (self._timer() - decide_started) * 1000
        self.decide_ms.append(decide_ms)
        for action in plan.actions:  # before any await: the snapshot must stop offering a worker being drained
            if isinstance(action, DrainGpu):
                self.view.draining.add(action.gpu_id)
        quiet = trigger == "period" and not plan.actions  # a periodic round that changed nothing: debug only
        log.log(logging.DEBUG if quiet else logging.INFO,
                "event=plan trigger=%s decide_ms=%.3f snapshot_ms=%.1f sessions=%d gpus=%d level=%s "
                "bottleneck_ms=%.0f target_gpus=%d actions=%d", trigger, decide_ms,
                (decide_started - started) * 1000, len(self.snapshot.sessions), len(self.snapshot.gpus),
                plan.level, plan.bottleneck_ms, plan.target_gpus, len(plan.actions))
        for action in plan.actions:
            lost = [w for w in workers_needed(action) if w in heard and w not in self.liveness.heard]
            if lost:  # each request to it would wait out its deadline; the next decision, already due, sees it
                log.info("event=action_skipped action=%s session=%s workers=%s reason='lost since the plan was made'",
                         type(action).__name__, getattr(action, "session_id", ""), ",".join(lost))
                continue
            try:
                await self._execute(action, now_s)
            except TurboServeError as exc:  # one refused action (a provisioner error, a lost row) is not the plan
                log.warning("event=action_failed action=%s code=%s detail=%r", type(action).__name__, exc.code,
                            str(exc))
        await self._unplace_orphans(rows)
        await self._record_asks()
        if self._learnt_kept_s is None or now_s - self._learnt_kept_s >= self._learnt_every_s:
            await self.keep_learnt()
        return plan

    async def recover(self) -> None:
        """Take back what an earlier scheduler left (it crashed, or this one took over): the workers it asked for,
        those still starting pending, so the first plan does not ask for them again; and what its policy learnt,
        as of when it was kept (a state this policy cannot read is logged and left: it starts from its priors).
        Before the first heartbeat is observed where it can be (``open_control_loop``), so a worker live before
        the restart is never taken for the answer to an ask; else in the first decision."""
        learnt = await self._store.load_learnt(self.controller.name)
        if learnt is not None:
            state, kept_at = learnt
            age_s = max(0.0, (self._wall_clock() - kept_at).total_seconds())
            try:
                self.controller.relearn(state, self._clock() - age_s)
                log.info("event=learnt_recovered policy=%s age_s=%.1f", self.controller.name, age_s)
            except LearntStateError as exc:
                log.warning("event=learnt_ignored policy=%s detail=%s", self.controller.name, exc)
        asks = await self._store.list_asks()
        live = {w.worker_id for w in await self._store.list_workers() if w.status == "live"}
        self.view.recover_asks(asks, live, self._clock(), self._wall_clock())
        self._recorded_asks = {w: self.view.asked_at[w] for w in asks}  # what the store holds, on this clock
        if asks:
            log.info("event=asks_recovered workers=%s pending=%s", ",".join(sorted(asks)),
                     ",".join(self.view.pending))

    async def _keep_parked_out(self) -> None:
        """Keep the workers the provisioner parked out of the pool: at the first decision (an earlier scheduler
        may have parked them) and after each removal. While the provisioner cannot answer it is asked again at
        every decision; meanwhile a worker this process removed is out for its retire grace, and one parked
        before this process began is in the pool."""
        self._parked_known = False
        try:
            parked = await self._provisioner.parked()
        except TurboServeError as exc:
            log.warning("event=parked_unknown code=%s detail=%s", exc.code, exc)
            return
        for worker_id in parked:
            self.view.park(worker_id)
        self._parked_known = True

    async def keep_learnt(self) -> None:
        """Store what the policy has learnt of the load, as of now."""
        now_s = self._clock()
        await self._store.save_learnt(self.controller.name, self.controller.learnt(now_s), self._wall_clock())
        self._learnt_kept_s = now_s

    async def _record_asks(self) -> None:
        """Write the workers asked for to the store when they changed (an ask, a first heartbeat that named a
        placeholder's worker, a release, a give-up)."""
        if self.view.asked_at != self._recorded_asks:
            await self._store.save_asks(self.view.asks(self._clock(), self._wall_clock()))
            self._recorded_asks = dict(self.view.asked_at)

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
        """A session with no live state goes through the conditional placement path (epoch bump; the gateway
        hears of it unless it is a new session, whose open request gets the answer); one whose state sits on
        another live worker moves there with the StateMover."""
        row = await self._open_row(session_id)
        if row is None or row.worker_id == gpu_id:
            return
        if row.worker_id is not None and row.worker_id in self.snapshot.gpus:
            await self._migrate(session_id, row.worker_id, gpu_id, reason)
            return
        if row.worker_id is not None:
            why = f"worker {row.worker_id} {self._worker_status.get(row.worker_id, 'unknown')}"
        elif row.epoch > 0 and session_id not in self._waiters:
            why = "it waited for capacity"
        else:
            why = ""
        try:
            moved = await self._store.move_session(session_id, expected_epoch=row.epoch, worker_id=gpu_id,
                                                   status=row.status, at=self._wall_clock())
        except StaleEpoch as exc:
            log_decision("skip", session_id, f"moved by another decision: {exc}")
            return
        waiter = self._waiters.get(session_id)
        log_decision("place", session_id, f"{why}; {reason}" if why else reason, worker=gpu_id, epoch=moved.epoch,
                     links=waiter.links if waiter is not None else None)
        placement = Placement(session_id, gpu_id, moved.epoch, why or reason, moved.gateway_id or "")
        if row.epoch > 0:
            await self._io.publish_placement(placement)
        self._answer(session_id, placement)

    async def _unplace_orphans(self, rows: Iterable[SessionRecord]) -> None:
        """Sessions still recorded on a worker that is not in the pool (lost, gone, released) after the plan
        ran: unplace them, so a resume or a later round places them afresh. Conditional on the epoch, so one
        that a migration moved meanwhile stays where it went."""
        for seen in rows:
            if seen.worker_id is None or seen.worker_id in self.snapshot.gpus:
                continue
            row = await self._open_row(seen.session_id)
            if row is None or row.worker_id is None or row.worker_id in self.snapshot.gpus:
                continue
            why = f"worker {row.worker_id} {self._worker_status.get(row.worker_id, 'not in the pool')}"
            try:
                await self._store.clear_placement(row.session_id, expected_epoch=row.epoch, status=row.status,
                                                  at=self._wall_clock())
            except StaleEpoch:
                continue
            if row.status == "idle":
                log_decision("unplace", row.session_id, f"{why}; idle, placed again on resume")
            else:
                log_decision("unplace", row.session_id, f"{why}; {self.unplaced_reason(row.model)}; "
                                                        "placed when a worker has room")

    async def _close_abandoned(self, rows: list[SessionRecord]) -> list[SessionRecord]:
        """Close the sessions whose gateway stopped renewing their lease more than ``linger_s`` ago (it died,
        and no client came back through another gateway): their capacity is freed. Returns the rows kept."""
        now = self._wall_clock()
        lapsed_before = now - timedelta(seconds=self._linger_s)
        kept: list[SessionRecord] = []
        for row in rows:
            if row.lease_until is None or row.lease_until >= lapsed_before:
                kept.append(row)
                continue
            closed = await self._store.close_abandoned(row.session_id, lapsed_before=lapsed_before, at=now)
            if closed is None:  # renewed or claimed since the rows were read
                kept.append(row)
                continue
            log_decision("close", row.session_id, f"gateway {closed.gateway_id} stopped renewing its lease and no "
                         f"client resumed it within the {self._linger_s:g} s linger", worker=closed.worker_id)
            if closed.worker_id is not None:
                await self._io.release(closed.worker_id, closed.session_id, closed.epoch)
        return kept

    def _answer(self, session_id: str, placement: Placement | None) -> None:
        waiter = self._waiters.pop(session_id, None)
        if waiter is not None and not waiter.answer.done():
            waiter.answer.set_result(placement)

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
        await self._record_asks()  # at once: a crash later in this round must not lose workers being paid for
        log.info("decision=add_gpus count=%d workers=%s kind=%s reason=%r", count, ",".join(added), action.kind,
                 action.reason)
        record_decision("add_gpus", action.reason, count=count, workers=",".join(added), kind=action.kind)

    async def _remove(self, action: RemoveGpu, now_s: float) -> None:
        worker_id = action.gpu_id
        if worker_id not in self.view.pending and not await self._emptied(worker_id, action.reason):
            return
        await self._provisioner.remove(worker_id, action.reason)
        record_scale_event("in")
        self.view.forget_worker(worker_id)
        self.view.retired[worker_id] = now_s + self._retire_grace_s
        await self._keep_parked_out()
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
        # The snapshot predates this plan: a worker an earlier action of it removed is still in it, and must not
        # take the state (the gateway would re-attach to a worker that is gone).
        targets = sorted((len(self.snapshot.residents[g]), g) for g, gpu in self.snapshot.gpus.items()
                         if g != worker_id and gpu.ready_at_s == 0.0 and g not in self.view.draining
                         and g not in self.view.retired)
        if left and not targets:
            log.info("event=remove_deferred worker=%s reason='no worker to take its idle sessions'", worker_id)
            return False
        moved = [await self._migrate(s.session_id, worker_id, targets[0][1], f"{reason}: move idle state")
                 for s in left]
        return all(moved)

    async def _expire_pending(self, now_s: float) -> None:
        for worker_id in list(self.view.pending):
            asked_s = self.view.asked_at[worker_id]
            if now_s - asked_s < self._provision_timeout_s:
                continue
            reason = f"asked for {now_s - asked_s:.0f} s ago and never heart-beat"
            self.view.forget_worker(worker_id)
            try:
                await self._provisioner.remove(worker_id, reason)
            except TurboServeError as exc:
                log.warning("event=pending_cancel_failed worker=%s detail=%s", worker_id, exc)
            log.info("decision=give_up_gpu worker=%s reason=%r", worker_id, reason)
