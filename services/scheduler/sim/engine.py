"""Event-level simulator: replays a session trace through a controller, the same object the live scheduler runs.

Between two events every GPU's per-chunk latency is constant, so chunks are counted analytically per interval
(GPUs holding n sessions produce n / chunk_interval_s chunks per second at l(n); past the capacity K, K of them
at l(K) and the rest after a second forward, ``LatencyCurve.batches``) instead of one by one. A chunk's
latency includes the time its session waited for a slot or for a GPU still provisioning (the chunks owed
during a wait of W are late by 0..W), what a restore adds to the batch it streams in under (the part of the copy
that batch's first DiT pass does not hide, ``RestoreCostModel``, on the next chunk of every session there), and
a migration's transfer time (its state's bytes
over the link between the two GPUs: within a node or across nodes) on the moving session's next chunk and on the
next chunk of every session on both GPUs, whose batch waits for it.
GPUs fill nodes of ``gpus_per_node`` in the order they are asked for. Offloads free the slot at once (the copy
to host runs in the background). GPUs are billed from the moment they are asked for until they are released, by
``SimConfig.billing``: a minimum or an increment not used up is charged at the release.

Every chunk over target is put down to one of ``LATE_CAUSES``, so a policy's misses say where they come from
(a tighter pool shows up as waits, the first-chunk rule as batches past capacity), and every billed GPU-second to
one of ``GPU_USES``, so its cost says where that comes from too.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from services.scheduler.policy.actions import AddGpus, DrainGpu, Migrate, Offload, Place, Plan, RemoveGpu, Restore
from services.scheduler.policy.billing import Billing
from services.scheduler.policy.controller import ClosedLoopController
from services.scheduler.policy.cost_models import LatencyModel, MigrationCostModel, RestoreCostModel
from services.scheduler.policy.snapshot import ClusterSnapshot, GpuView, SessionView
from services.scheduler.sim.distribution import LatencyDistribution
from services.scheduler.sim.results import SimResult, TimeSeries
from services.scheduler.sim.trace import EventKind, Trace

LATE_CAUSES = ("over_capacity", "waiting", "restore", "migration")
"""A batch past the GPU's capacity (overflow slots), chunks owed while a session waited for a slot or a GPU, a
batch held up by a restore streaming in, a batch held up by a migration's transfer."""


GPU_USES = ("serving", "provisioning", "headroom", "held", "after_release")
"""A ready GPU the lower bound counts too (max(min_gpus, ceil(active / K)) of them), a GPU asked for and not yet
ready, a ready GPU beyond that need up to the autoscaler's latest target (its headroom), a ready GPU beyond both
(the scale-in hold, a drain in progress, or a GPU kept while it is paid for), and the time charged after a
release (a billing minimum or increment not used up). The lower bound less the serving GPU-hours is the need no
ready GPU met: the waits and overflow slots of ``LATE_CAUSES``."""


class SimulationError(RuntimeError):
    """A plan the cluster cannot execute (a policy bug): placing on a full or missing GPU, removing a busy one."""


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Ground truth of the simulated cluster. The transfer models here are the truth the controller's fitted
    models are compared against; ``sample_s`` is the resolution of the time series."""

    provisioning_delay_s: float = 30.0
    chunk_interval_s: float = 0.75
    target_ms: float = 400.0
    tick_s: float = 10.0
    sample_s: float = 60.0
    gpu_kind: str = "h100"
    gpu_capacity: int = 4
    min_gpus: int = 1
    gpus_per_node: int = 8
    overflow_slots: int = 4
    billing: Billing = Billing()


_TICK, _SAMPLE, _READY, _WAKE = 10, 11, 12, 13


class Simulator:
    """One replay. ``progress`` is called with the simulated time now and then (for a progress bar)."""

    def __init__(
        self,
        trace: Trace,
        controller: ClosedLoopController,
        config: SimConfig,
        latency: LatencyModel,
        migration: MigrationCostModel,
        restore: RestoreCostModel,
        progress: Callable[[float], None] | None = None,
    ) -> None:
        self.trace, self.controller, self.config = trace, controller, config
        self.latency, self.migration, self.restore = latency, migration, restore
        self.progress = progress
        self.snapshot = ClusterSnapshot()
        self.distribution = LatencyDistribution()
        self.series = TimeSeries()
        self._wait_since: dict[str, float] = {}
        self._opened_at: dict[str, float] = {}
        self._first_chunk_s: list[float] = []
        self._state_bytes = {s.session_id: s.state_bytes for s in trace.sessions}
        self._gpu_ids = itertools.count()
        self._node_of: dict[str, int] = {}
        self._node_load: dict[int, int] = {}
        self._dynamic: list[tuple[float, int, str]] = []
        self._now_s = 0.0
        self._gpu_seconds = 0.0
        self._window_worst_ms = 0.0
        self._window_chunks = 0.0
        self._window_late = 0.0
        self._late_by_cause = dict.fromkeys(LATE_CAUSES, 0.0)
        self._gpu_seconds_by_use = dict.fromkeys(GPU_USES, 0.0)
        self._provisioning: set[str] = set()
        self._pool_target = controller.initial_gpus
        self._counters = dict.fromkeys(
            ("migrations", "migrated_bytes", "offloads", "restores", "placements", "scale_out_events",
             "gpus_added", "scale_in_events", "gpus_removed", "decisions", "unserved_opens"), 0
        )
        self._decide_s: list[float] = []

    def _in_window(self, time_s: float) -> bool:
        return self.trace.window_start_s <= time_s <= self.trace.window_end_s

    def _hold_up(self, gpu_id: str, extra_ms: float, cause: str) -> None:
        """The next chunk of every session on ``gpu_id`` comes ``extra_ms`` after its steady latency."""
        if not self._in_window(self._now_s):
            return
        for steady_ms, sessions in self._batches_on(gpu_id):
            self._count(steady_ms, steady_ms, -sessions, cause)
            self._count(steady_ms + extra_ms, steady_ms + extra_ms, sessions, cause)

    def _count(self, low_ms: float, high_ms: float, chunks: float, cause: str) -> None:
        """``chunks`` spread evenly between ``low_ms`` and ``high_ms`` (negative: taken back at one latency), into
        the distribution, the sample window and ``cause``'s late chunks."""
        if low_ms == high_ms:
            self.distribution.add_point(low_ms, chunks)
        else:
            self.distribution.add_range(low_ms, high_ms, chunks)
        late = chunks * self._late_share(low_ms, high_ms)
        self._late_by_cause[cause] += late
        self._window_chunks += chunks
        if chunks > 0:
            self._window_worst_ms = max(self._window_worst_ms, high_ms)
            self._window_late += late

    def _late_share(self, low_ms: float, high_ms: float) -> float:
        """The share over target of chunks spread evenly between ``low_ms`` and ``high_ms``."""
        if high_ms <= self.config.target_ms:
            return 0.0
        return 1.0 if high_ms == low_ms else min(1.0, (high_ms - self.config.target_ms) / (high_ms - low_ms))

    def _advance(self, to_s: float) -> None:
        """Account the chunks every GPU produced since the last event, at its (constant) latency."""
        low_s, high_s = max(self._now_s, self.trace.window_start_s), min(to_s, self.trace.window_end_s)
        span_s = high_s - low_s
        if span_s > 0:
            self._gpu_seconds += span_s * len(self.snapshot.gpus)
            self._bill_by_use(span_s)
            per_session = span_s / self.config.chunk_interval_s
            for (kind, count), gpus in self.snapshot.levels.items():
                if not gpus:
                    continue
                for value_ms, sessions in self.latency.curve(kind).batches(count):
                    self._count(value_ms, value_ms, per_session * sessions * len(gpus), "over_capacity")
        self._now_s = to_s

    def _bill_by_use(self, span_s: float) -> None:
        config = self.config
        need = max(config.min_gpus, math.ceil(self.snapshot.active_count / config.gpu_capacity))
        provisioning = len(self._provisioning)
        ready = len(self.snapshot.gpus) - provisioning
        uses = self._gpu_seconds_by_use
        uses["serving"] += span_s * min(ready, need)
        uses["provisioning"] += span_s * provisioning
        uses["headroom"] += span_s * max(0, min(ready, self._pool_target) - need)
        uses["held"] += span_s * max(0, ready - max(self._pool_target, need))

    def _settle_wait(self, session_id: str, first_chunk_ms: float) -> None:
        """Account the chunks a session owed while it waited W: late by 0..W on top of its first chunk's latency."""
        since_s = self._wait_since.pop(session_id, None)
        if since_s is None or self._now_s <= since_s or not self._in_window(self._now_s):
            return
        waited_s = self._now_s - since_s
        owed = waited_s / self.config.chunk_interval_s
        low_ms, high_ms = first_chunk_ms, first_chunk_ms + waited_s * 1000.0
        self._count(low_ms, high_ms, owed, "waiting")

    def _note_first_chunk(self, session_id: str, chunk_ms: float) -> None:
        """Time from a session's open to its first chunk: its wait for a slot plus that chunk's latency."""
        opened_s = self._opened_at.pop(session_id, None)
        if opened_s is not None and self._in_window(opened_s):
            self._first_chunk_s.append(self._now_s - opened_s + chunk_ms / 1000.0)

    def _session(self, session_id: str) -> SessionView:
        session = self.snapshot.sessions.get(session_id)
        if session is None:
            raise SimulationError(f"plan names unknown session {session_id!r}")
        return session

    def _batches_on(self, gpu_id: str) -> tuple[tuple[float, int], ...]:
        gpu = self.snapshot.gpus[gpu_id]
        return self.latency.curve(gpu.kind).batches(len(self.snapshot.residents[gpu_id]))

    def _put(self, session: SessionView, gpu_id: str, restored: bool) -> None:
        gpu = self.snapshot.gpus.get(gpu_id)
        if gpu is None or gpu.draining or gpu.ready_at_s > self._now_s:
            raise SimulationError(f"cannot place {session.session_id!r} on unusable GPU {gpu_id!r}")
        if not session.active or session.gpu_id is not None:
            raise SimulationError(f"session {session.session_id!r} is not an active unplaced session")
        self.snapshot.upsert_session(
            SessionView(session.session_id, session.state_bytes, True, gpu_id, session.last_migrated_at_s, False)
        )
        steady_ms = self._batches_on(gpu_id)[0][0]  # no deadline yet: earliest due, so in the first forward
        extra_ms = self.restore.delay_ms(session.state_bytes, steady_ms) if restored else 0.0
        self._note_first_chunk(session.session_id, steady_ms)
        self._settle_wait(session.session_id, steady_ms + extra_ms)
        if extra_ms:  # every forward the restore streams in under, or waits behind, is held up
            self._hold_up(gpu_id, extra_ms, "restore")
        self._counters["restores" if restored else "placements"] += 1

    def _apply(self, plan: Plan) -> bool:
        """Execute a plan; True when it started a drain, so the caller decides again at once."""
        drained = False
        for action in plan.actions:
            if isinstance(action, Offload):
                session = self._session(action.session_id)
                if session.active or session.gpu_id != action.gpu_id:
                    raise SimulationError(f"offload of {action.session_id!r} which is active or elsewhere")
                self.snapshot.upsert_session(SessionView(session.session_id, session.state_bytes, False, None,
                                                         session.last_migrated_at_s, True))
                self._counters["offloads"] += 1
            elif isinstance(action, (Place, Restore)):
                self._put(self._session(action.session_id), action.gpu_id, isinstance(action, Restore))
            elif isinstance(action, Migrate):
                self._migrate(action)
            elif isinstance(action, AddGpus):
                self._add_gpus(action)
            elif isinstance(action, DrainGpu):
                gpu = self.snapshot.gpus[action.gpu_id]
                self.snapshot.upsert_gpu(replace(gpu, draining=True))
                self._counters["scale_in_events"] += 1
                drained = True
            elif isinstance(action, RemoveGpu):
                self._remove_gpu(action.gpu_id)
        return drained

    def _migrate(self, action: Migrate) -> None:
        session = self._session(action.session_id)
        target = self.snapshot.gpus.get(action.target_gpu_id)
        if session.gpu_id != action.source_gpu_id or target is None or target.ready_at_s > self._now_s:
            raise SimulationError(f"bad migration {action}")
        same_node = self._node_of[action.source_gpu_id] == self._node_of[action.target_gpu_id]
        transfer_ms = self.migration.cost_ms(session.state_bytes, same_node)
        self.snapshot.upsert_session(SessionView(session.session_id, session.state_bytes, session.active,
                                                 action.target_gpu_id, self._now_s, False))
        for gpu_id in (action.source_gpu_id, action.target_gpu_id):
            self._hold_up(gpu_id, transfer_ms, "migration")
        self._counters["migrations"] += 1
        self._counters["migrated_bytes"] += session.state_bytes

    def _add_gpus(self, action: AddGpus) -> None:
        if action.count < 1:
            raise SimulationError(f"AddGpus with count {action.count}")
        ready_s = self._now_s + self.config.provisioning_delay_s
        for _ in range(action.count):
            gpu_id = f"gpu{next(self._gpu_ids):05d}"
            capacity = self.latency.curve(action.kind).capacity
            self._add_gpu(GpuView(gpu_id, action.kind, capacity, ready_s, billed_since_s=self._now_s))
            self._provisioning.add(gpu_id)
            heapq.heappush(self._dynamic, (ready_s, _READY, gpu_id))
        self._counters["scale_out_events"] += 1
        self._counters["gpus_added"] += action.count

    def _add_gpu(self, gpu: GpuView) -> None:
        """On the first node with room: a cloud hands out GPUs of partly used nodes first."""
        node = next(n for n in itertools.count() if self._node_load.get(n, 0) < self.config.gpus_per_node)
        self._node_of[gpu.gpu_id] = node
        self._node_load[node] = self._node_load.get(node, 0) + 1
        self.snapshot.upsert_gpu(GpuView(gpu.gpu_id, gpu.kind, gpu.capacity, gpu.ready_at_s, node=f"node{node}",
                                         overflow_slots=self.config.overflow_slots,
                                         billed_since_s=gpu.billed_since_s))

    def _remove_gpu(self, gpu_id: str) -> None:
        gpu = self.snapshot.gpus.get(gpu_id)
        if gpu is None:
            raise SimulationError(f"remove of unknown GPU {gpu_id!r}")
        if gpu.billed_since_s is not None and self._in_window(self._now_s):
            held_s = self._now_s - gpu.billed_since_s
            unused_s = self.config.billing.charged_s(held_s) - held_s
            self._gpu_seconds += unused_s
            self._gpu_seconds_by_use["after_release"] += unused_s
        self.snapshot.remove_gpu(gpu_id)
        self._provisioning.discard(gpu_id)
        self._node_load[self._node_of.pop(gpu_id)] -= 1
        self._counters["gpus_removed"] += 1

    def _decide(self) -> None:
        for _ in range(4):
            started = time.perf_counter()
            plan = self.controller.decide(self.snapshot, self._now_s)
            self._decide_s.append(time.perf_counter() - started)
            self._counters["decisions"] += 1
            self._pool_target = plan.target_gpus
            if not self._apply(plan):
                return

    def _wake_after_wait(self) -> None:
        """Decide again when a session that began to wait now may take an overflow slot: a live scheduler
        decides every few seconds anyway, the simulator only on events and ticks."""
        config = self.controller.config
        if config.overflow_slots:
            heapq.heappush(self._dynamic, (self._now_s + config.overflow_after_s, _WAKE, ""))

    def _handle_trace_event(self, kind: int, session_id: str) -> None:
        snapshot = self.snapshot
        if kind == EventKind.ARRIVE:
            snapshot.upsert_session(SessionView(session_id, self._state_bytes[session_id], True, None,
                                                waiting_since_s=self._now_s))
            self._wait_since[session_id] = self._now_s
            self._wake_after_wait()
            self._opened_at[session_id] = self._now_s
            return
        session = snapshot.sessions[session_id]
        if kind == EventKind.ACTIVE:
            waiting_since_s = self._now_s if session.gpu_id is None else None
            snapshot.upsert_session(SessionView(session_id, session.state_bytes, True, session.gpu_id,
                                                session.last_migrated_at_s, session.offloaded,
                                                waiting_since_s=waiting_since_s))
            if waiting_since_s is not None:
                self._wait_since[session_id] = self._now_s
                self._wake_after_wait()
        elif kind == EventKind.IDLE:
            if session.gpu_id is None and session_id in self._opened_at:
                self._counters["unserved_opens"] += 1
                self._note_first_chunk(session_id, 0.0)
            self._settle_wait(session_id, 0.0)
            offloaded = session.offloaded or session.gpu_id is None
            snapshot.upsert_session(SessionView(session_id, session.state_bytes, False, session.gpu_id,
                                                session.last_migrated_at_s, offloaded))
        else:
            snapshot.remove_session(session_id)

    def run(self) -> SimResult:
        config = self.config
        events = self.trace.events()
        start_s = min(events[0][0], self.trace.window_start_s) if events else self.trace.window_start_s
        self._now_s = start_s
        for index in range(self.controller.initial_gpus):
            self._add_gpu(GpuView(f"init{index:05d}", config.gpu_kind, config.gpu_capacity, start_s,
                                  billed_since_s=start_s))
        end_s = max(self.trace.window_end_s, events[-1][0] if events else start_s)
        heapq.heappush(self._dynamic, (start_s + config.tick_s, _TICK, ""))
        first_sample_s = self.trace.window_start_s + config.sample_s
        heapq.heappush(self._dynamic, (first_sample_s, _SAMPLE, ""))
        next_report_s = start_s
        index = 0
        while index < len(events) or self._dynamic:
            if self._dynamic and (index >= len(events) or self._dynamic[0][0] < events[index][0]):
                time_s, kind, key = heapq.heappop(self._dynamic)
                if time_s > end_s:
                    break
                self._advance(time_s)
                if kind == _TICK:
                    heapq.heappush(self._dynamic, (time_s + config.tick_s, _TICK, ""))
                elif kind == _SAMPLE:
                    self._sample()
                    heapq.heappush(self._dynamic, (time_s + config.sample_s, _SAMPLE, ""))
                    continue
                elif kind == _READY:
                    self._provisioning.discard(key)
                    if key not in self.snapshot.gpus:
                        continue
            else:
                time_s, kind, key = events[index]
                index += 1
                self._advance(time_s)
                self._handle_trace_event(kind, key)
            self._decide()
            if self.progress is not None and time_s >= next_report_s:
                self.progress(time_s - start_s)
                next_report_s = time_s + 600.0
        self._advance(end_s)
        for session_id in list(self._wait_since):
            if session_id in self._opened_at:
                self._counters["unserved_opens"] += 1
                self._note_first_chunk(session_id, 0.0)
            self._settle_wait(session_id, 0.0)
        return self._result()

    def _sample(self) -> None:
        if not self._in_window(self._now_s):
            return
        self.series.append(
            self._now_s - self.trace.window_start_s,
            self.snapshot.active_count,
            len(self.snapshot.gpus),
            self._window_worst_ms,
            self._window_late / self._window_chunks if self._window_chunks > 0 else 0.0,
        )
        self._window_worst_ms = self._window_chunks = self._window_late = 0.0

    def _result(self) -> SimResult:
        decide_ms = sorted(s * 1000.0 for s in self._decide_s) or [0.0]
        return SimResult(
            policy=self.controller.name,
            trace=self.trace.name,
            gpu_hours=self._gpu_seconds / 3600.0,
            worst_latency_ms=self.distribution.worst_ms,
            p99_latency_ms=self.distribution.quantile_ms(0.99),
            over_target_frac=self.distribution.fraction_above(self.config.target_ms),
            over_interval_frac=self.distribution.fraction_above(self.config.chunk_interval_s * 1000.0),
            total_chunks=self.distribution.total_chunks,
            counters=dict(self._counters),
            decide_median_ms=decide_ms[len(decide_ms) // 2],
            decide_p99_ms=decide_ms[min(len(decide_ms) - 1, math.ceil(0.99 * len(decide_ms)) - 1)],
            series=self.series,
            first_chunk_s=sorted(self._first_chunk_s),
            late_chunks_by_cause=dict(self._late_by_cause),
            gpu_hours_by_use={use: seconds / 3600.0 for use, seconds in self._gpu_seconds_by_use.items()},
        )
