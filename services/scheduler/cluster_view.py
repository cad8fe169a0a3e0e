"""The control loop's picture of the cluster: PostgreSQL rows plus what only this process knows (heartbeats'
offloaded sets and state sizes, drains in progress, workers asked for, workers released), turned into the
policy's ``SessionView``/``GpuView`` rows and kept in one long-lived ``ClusterSnapshot``.

The snapshot lives across decisions because the workload detector reads its monotonic arrival and transition
counters; ``sync`` applies row changes to it in an order that never passes through an impossible state.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from services.common.messages import WorkerHeartbeat
from services.scheduler.policy import ClusterSnapshot, GpuView, SessionView, SnapshotError
from services.scheduler.store.protocol import SessionRecord, WorkerRecord

log = logging.getLogger("turboserve.scheduler.control")


@dataclass(slots=True)
class ClusterView:
    """Knowledge beyond the session and worker rows. ``asked_at``: worker id -> when it was asked for (monotonic
    s), kept past its first heartbeat, since its bill counts from then (unknown for a worker nobody recorded
    asking for); ``pending``: the workers asked for and not yet heard from, in the order asked. The control loop
    records both in the store (``asks``) and a restarted scheduler takes them back (``recover_asks``), so it
    neither asks again for workers still starting nor forgets when their bill began. ``adopted``: workers live
    before this process began, whose first heartbeat here answers no placeholder;
    ``retired``: a removed worker -> the time from which a heartbeat it sends brings it back into the pool (an
    external system that did not act); until then, and for a worker that never beats again, it is out of the
    pool whatever its row says. A parked one (``park``) never comes back by beating: only an ask takes it back."""

    kinds: tuple[str, ...]
    scale_kind: str
    capacity: int
    overflow_slots: int = 0
    node_of: dict[str, str] = field(default_factory=dict)
    waiting_since: dict[str, float] = field(default_factory=dict)
    offloaded: dict[str, frozenset[str]] = field(default_factory=dict)
    state_bytes: dict[str, int] = field(default_factory=dict)
    kind_of: dict[str, str] = field(default_factory=dict)
    draining: set[str] = field(default_factory=set)
    pending: dict[str, None] = field(default_factory=dict)
    asked_at: dict[str, float] = field(default_factory=dict)
    retired: dict[str, float] = field(default_factory=dict)
    migrated_at: dict[str, float] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    adopted: set[str] = field(default_factory=set)

    def observe(self, beat: WorkerHeartbeat, now_s: float) -> bool:
        """Record a heartbeat; True when this worker is new to this process (a scheduling event)."""
        back_from_s = self.retired.get(beat.worker_id)
        if back_from_s is not None and now_s >= back_from_s:
            del self.retired[beat.worker_id]
        self.offloaded[beat.worker_id] = frozenset(beat.offloaded)
        self.state_bytes.update(beat.state_bytes)
        self.kind_of[beat.worker_id] = self.policy_kind(beat.kind)
        self.node_of[beat.worker_id] = beat.node
        if beat.worker_id in self.pending:  # new, or one this process knew taken back (a parked pod, an ordinal)
            del self.pending[beat.worker_id]
            self.seen.add(beat.worker_id)
            return True
        if beat.worker_id in self.seen:
            return False
        self.seen.add(beat.worker_id)
        if beat.worker_id not in self.adopted:
            placeholder = next((p for p in self.pending if p.startswith("pending-")), None)
            if placeholder is not None:  # an external provisioner's worker: ids are unknown until they beat
                del self.pending[placeholder]
                self.asked_at[beat.worker_id] = self.asked_at.pop(placeholder)
        return True

    def policy_kind(self, kind: str) -> str:
        """Workers of a kind the latency model does not know are priced as the kind the pool scales with."""
        return kind if kind in self.kinds else self.scale_kind

    def add_pending(self, worker_ids: Iterable[str], count: int, now_s: float) -> list[str]:
        ids = [w for w in worker_ids if w not in self.seen or w in self.retired]
        for worker_id in ids:
            self.retired.pop(worker_id, None)
        while len(ids) < count:  # unique across restarts, since the record of asks outlives this process
            ids.append(f"pending-{uuid.uuid4().hex[:12]}")
        for worker_id in ids:
            self.pending[worker_id] = None
            self.asked_at[worker_id] = now_s
        return ids

    def asks(self, now_s: float, wall_now: datetime) -> dict[str, datetime]:
        """``asked_at`` in wall time, as the store records it."""
        return {w: wall_now - timedelta(seconds=now_s - asked_s) for w, asked_s in self.asked_at.items()}

    def recover_asks(self, asks: Mapping[str, datetime], live: Collection[str], now_s: float,
                     wall_now: datetime) -> None:
        """Take back what an earlier scheduler recorded: a worker not ``live`` yet is still pending, and every one
        is billed from when it was asked for (a clock behind the record's reads as asked just now). Asks this
        process has made already are kept."""
        self.adopted.update(live)
        for worker_id, at in sorted(asks.items(), key=lambda ask: ask[1]):
            if worker_id in self.asked_at:
                continue
            self.asked_at[worker_id] = now_s - max(0.0, (wall_now - at).total_seconds())
            if worker_id not in live:
                self.pending[worker_id] = None

    def park(self, worker_id: str) -> None:
        """A removed worker the provisioner keeps running (a StatefulSet's pod below its top) stays out of the
        pool until ``add_pending`` takes it back."""
        self.retired[worker_id] = math.inf

    def forget_gone(self, workers: Iterable[WorkerRecord]) -> None:
        """Stop billing workers whose rows left the pool (lost, gone) and that are not being waited for."""
        out = {w.worker_id for w in workers if w.status != "live"}
        for worker_id in [w for w in self.asked_at if w in out and w not in self.pending]:
            del self.asked_at[worker_id]

    def forget_worker(self, worker_id: str) -> None:
        """A worker given back or given up on: it is not asked for, nor billed, any more."""
        self.pending.pop(worker_id, None)
        self.asked_at.pop(worker_id, None)
        self.draining.discard(worker_id)

    def forget_closed(self, open_ids: set[str]) -> None:
        """Per-session knowledge lives as long as the session: drop what closed sessions left behind."""
        for known in (self.state_bytes, self.migrated_at, self.waiting_since):
            for session_id in [s for s in known if s not in open_ids]:
                del known[session_id]

    def mark_offloaded(self, worker_id: str, session_id: str) -> None:
        self.offloaded[worker_id] = self.offloaded.get(worker_id, frozenset()) | {session_id}

    def schedulable(self, worker: WorkerRecord) -> bool:
        return worker.status == "live" and worker.worker_id not in self.retired

    def gpu_views(self, workers: Iterable[WorkerRecord], heard: Collection[str]) -> dict[str, GpuView]:
        """Live workers in the pool, and the ones asked for. A live row this process has not ``heard`` yet keeps
        its residents but takes nothing new (ready at infinity) until its first heartbeat here."""
        gpus = {
            w.worker_id: GpuView(w.worker_id, self.policy_kind(w.kind), w.capacity,
                                 0.0 if w.worker_id in heard else math.inf,
                                 w.draining or w.worker_id in self.draining, w.model,
                                 self.node_of.get(w.worker_id, ""), self.overflow_slots,
                                 self.asked_at.get(w.worker_id))
            for w in workers
            if self.schedulable(w)
        }
        for worker_id in self.pending:
            if worker_id not in gpus:
                gpus[worker_id] = GpuView(worker_id, self.scale_kind, self.capacity, math.inf,
                                          billed_since_s=self.asked_at.get(worker_id))
        return gpus

    def session_views(
        self, rows: Iterable[SessionRecord], gpus: Mapping[str, GpuView], now_s: float, wall_now: datetime
    ) -> dict[str, SessionView]:
        """Active sessions claim slots (overflow ones included) before idle residents; a session that finds no
        slot on its worker (a resume onto a full worker, a worker that is gone) waits for the policy to place it,
        since its row last changed (``waited_s``); an idle one whose state left the slot is offloaded (placing it
        is a restore)."""
        room = {gpu_id: gpu.slots for gpu_id, gpu in gpus.items()}
        views: dict[str, SessionView] = {}
        for row in sorted(rows, key=lambda r: r.status != "active"):
            sid = row.session_id
            gpu = gpus.get(row.worker_id) if row.worker_id is not None else None
            on = row.worker_id if gpu is not None else None
            size = self.state_bytes.get(sid, 0)
            moved_at = self.migrated_at.get(sid)
            active = row.status == "active"
            out_of_slot = on is None or (not active and sid in self.offloaded.get(on, frozenset()))
            if not active and out_of_slot:
                views[sid] = SessionView(sid, size, False, None, moved_at, True, row.model)
            elif on is not None and room[on] > 0:
                room[on] -= 1
                views[sid] = SessionView(sid, size, active, on, moved_at, False, row.model)
            else:
                has_state = row.worker_id is not None or row.chunks_produced > 0
                since_s = self.waiting_since.setdefault(sid, now_s - waited_s(row, wall_now)) if active else None
                views[sid] = SessionView(sid, size, active, None, moved_at, has_state or not active, row.model,
                                         since_s)
            if views[sid].waiting_since_s is None:
                self.waiting_since.pop(sid, None)
        return views


def waited_s(row: SessionRecord, wall_now: datetime) -> float:
    """How long a session without a slot has waited: since its row last changed, since nothing writes the row of
    a session that waits (a resume sets its status, a lost worker stopped its progress writes). So a scheduler
    that restarts, or takes over, does not start the wait for an overflow slot over again. A row written by a
    clock ahead of ours reads as no wait at all, never as a negative one."""
    return max(0.0, (wall_now - row.updated_at).total_seconds())


def sync(
    snapshot: ClusterSnapshot, sessions: Mapping[str, SessionView], gpus: Mapping[str, GpuView]
) -> ClusterSnapshot:
    """Make ``snapshot`` hold exactly these rows. Changed sessions leave their GPU first, so swaps and GPU
    removals never overfill or orphan; a contradiction rebuilds from scratch, keeping the detector's counters."""
    try:
        changed = [sid for sid, view in sessions.items() if snapshot.sessions.get(sid) != view]
        for sid in changed:
            old = snapshot.sessions.get(sid)
            if old is not None and old.gpu_id is not None and old.gpu_id != sessions[sid].gpu_id:
                snapshot.upsert_session(SessionView(sid, old.state_bytes, old.active, None, old.last_migrated_at_s,
                                                    old.offloaded, old.model))
        for sid in [s for s in snapshot.sessions if s not in sessions]:
            snapshot.remove_session(sid)
        for gpu_id in [g for g in snapshot.gpus if g not in gpus]:
            snapshot.remove_gpu(gpu_id)
        for gpu_id, gpu in gpus.items():
            if snapshot.gpus.get(gpu_id) != gpu:
                snapshot.upsert_gpu(gpu)
        for sid in changed:
            snapshot.upsert_session(sessions[sid])
        return snapshot
    except SnapshotError as exc:
        log.warning("event=snapshot_rebuilt reason=%r", str(exc))
        fresh = ClusterSnapshot.build(sessions.values(), gpus.values())
        fresh.arrivals_total = snapshot.arrivals_total
        fresh.activations_total = snapshot.activations_total
        fresh.deactivations_total = snapshot.deactivations_total
        return fresh
