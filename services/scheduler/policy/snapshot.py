"""The cluster as the policy sees it: plain session and GPU rows, kept with the indexes a decision needs.

A runner builds one ``ClusterSnapshot`` (``ClusterSnapshot.build(sessions, gpus)`` from database rows) and may
keep it alive, upserting rows as they change: every index is maintained per row change, so a decision reads
what it needs without rescanning every session. The policy only ever reads it.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass


class SnapshotError(ValueError):
    """A row contradicts the snapshot (unknown GPU, a GPU over capacity, a bad value): the caller's data is wrong."""


@dataclass(frozen=True, slots=True)
class SessionView:
    """One session. ``offloaded`` means its state sits in host memory, so placing it is a restore; ``model``
    (empty: any) limits it to GPUs serving that model; ``waiting_since_s``: when an active session without a
    GPU began to wait (None: not waiting, or not known)."""

    session_id: str
    state_bytes: int
    active: bool
    gpu_id: str | None
    last_migrated_at_s: float | None = None
    offloaded: bool = False
    model: str = ""
    waiting_since_s: float | None = None


@dataclass(frozen=True, slots=True)
class GpuView:
    """One GPU: ``capacity`` resident sessions meet the latency target; ``overflow_slots`` more fit in its memory
    and still play in real time, late for the target (a policy may use them rather than leave a session
    waiting); unusable before ``ready_at_s``; ``draining`` takes none; ``model`` (empty: any) is the only model
    whose sessions it takes; ``node`` (empty: unknown) says which GPUs share a fast link; ``billed_since_s``: when
    it was asked for, which its bill counts from (None: unknown)."""

    gpu_id: str
    kind: str
    capacity: int
    ready_at_s: float
    draining: bool = False
    model: str = ""
    node: str = ""
    overflow_slots: int = 0
    billed_since_s: float | None = None

    @property
    def slots(self) -> int:
        return self.capacity + self.overflow_slots


class ClusterSnapshot:
    """Sessions and GPUs with incremental indexes (``levels``: GPUs by kind and resident count); ``*_total``
    counters let a detector see arrivals and transitions between two decisions without diffing the session table."""

    def __init__(self) -> None:
        self.sessions: dict[str, SessionView] = {}
        self.gpus: dict[str, GpuView] = {}
        self.residents: dict[str, dict[str, None]] = {}
        self.active_on: dict[str, int] = {}
        self.waiting: dict[str, None] = {}
        self.idle_resident: dict[str, None] = {}
        self.levels: dict[tuple[str, int], dict[str, None]] = {}
        self.draining: dict[str, None] = {}
        self.capacities: dict[str, collections.Counter[int]] = {}
        self.active_count = 0
        self.overflow_slots_total = 0
        self.arrivals_total = 0
        self.activations_total = 0
        self.deactivations_total = 0

    @classmethod
    def build(cls, sessions: Iterable[SessionView], gpus: Iterable[GpuView]) -> ClusterSnapshot:
        snapshot = cls()
        for gpu in gpus:
            snapshot.upsert_gpu(gpu)
        for session in sessions:
            snapshot.upsert_session(session)
        return snapshot

    def upsert_gpu(self, gpu: GpuView) -> None:
        if gpu.capacity < 1 or gpu.overflow_slots < 0:
            raise SnapshotError(f"GPU {gpu.gpu_id!r} has capacity {gpu.capacity} and {gpu.overflow_slots} overflow "
                                "slots; it needs at least 1 and no fewer than 0")
        previous = self.residents.get(gpu.gpu_id)
        if previous is not None and len(previous) > gpu.slots:
            raise SnapshotError(
                f"GPU {gpu.gpu_id!r} holds {len(previous)} sessions, more than its new {gpu.slots} slots"
            )
        old = self.gpus.get(gpu.gpu_id)
        if old is not None:
            self._level_remove(old.kind, len(self.residents[gpu.gpu_id]), gpu.gpu_id)
            self.overflow_slots_total -= old.overflow_slots
            self.capacities[old.kind][old.capacity] -= 1
        self.gpus[gpu.gpu_id] = gpu
        self.capacities.setdefault(gpu.kind, collections.Counter())[gpu.capacity] += 1
        self.overflow_slots_total += gpu.overflow_slots
        residents = self.residents.setdefault(gpu.gpu_id, {})
        self.active_on.setdefault(gpu.gpu_id, 0)
        self._level_add(gpu.kind, len(residents), gpu.gpu_id)
        if gpu.draining:
            self.draining[gpu.gpu_id] = None
        else:
            self.draining.pop(gpu.gpu_id, None)

    def remove_gpu(self, gpu_id: str) -> None:
        residents = self.residents.get(gpu_id)
        if residents is None:
            raise SnapshotError(f"unknown GPU {gpu_id!r}")
        if residents:
            raise SnapshotError(f"GPU {gpu_id!r} still holds {len(residents)} sessions; move them first")
        gpu = self.gpus[gpu_id]
        self._level_remove(gpu.kind, 0, gpu_id)
        self.overflow_slots_total -= gpu.overflow_slots
        self.capacities[gpu.kind][gpu.capacity] -= 1
        self.draining.pop(gpu_id, None)
        del self.gpus[gpu_id], self.residents[gpu_id], self.active_on[gpu_id]

    def typical_capacity(self, kind: str) -> int | None:
        """The median capacity the GPUs of ``kind`` report (None: there are none). A worker measures its own K
        (``gpu_worker/capacity.py``), which may be below the K it was configured with."""
        counts = self.capacities.get(kind, collections.Counter())
        total = sum(counts.values())
        if total == 0:
            return None
        seen = 0
        for capacity in sorted(counts):
            seen += counts[capacity]
            if 2 * seen > total:
                return capacity
        raise AssertionError("unreachable: the counts add up to the total")

    def _level_add(self, kind: str, count: int, gpu_id: str) -> None:
        self.levels.setdefault((kind, count), {})[gpu_id] = None

    def _level_remove(self, kind: str, count: int, gpu_id: str) -> None:
        level = self.levels[(kind, count)]
        del level[gpu_id]
        if not level:
            del self.levels[(kind, count)]

    def _shift_level(self, gpu_id: str, before: int, after: int) -> None:
        kind = self.gpus[gpu_id].kind
        self._level_remove(kind, before, gpu_id)
        self._level_add(kind, after, gpu_id)

    def upsert_session(self, session: SessionView) -> None:
        if session.state_bytes < 0:
            raise SnapshotError(f"session {session.session_id!r} has negative state_bytes {session.state_bytes}")
        if session.gpu_id is not None:
            residents = self.residents.get(session.gpu_id)
            if residents is None:
                raise SnapshotError(f"session {session.session_id!r} is on unknown GPU {session.gpu_id!r}")
            already_there = session.session_id in residents
            if not already_there and len(residents) >= self.gpus[session.gpu_id].slots:
                raise SnapshotError(f"GPU {session.gpu_id!r} is full; cannot add session {session.session_id!r}")
        previous = self.sessions.get(session.session_id)
        if previous is None:
            self.arrivals_total += 1
        else:
            self._unindex(previous)
            if session.active and not previous.active:
                self.activations_total += 1
            elif previous.active and not session.active:
                self.deactivations_total += 1
        self.sessions[session.session_id] = session
        self._index(session)

    def remove_session(self, session_id: str) -> None:
        previous = self.sessions.pop(session_id, None)
        if previous is None:
            raise SnapshotError(f"unknown session {session_id!r}")
        if previous.active:
            self.deactivations_total += 1
        self._unindex(previous)

    def _index(self, session: SessionView) -> None:
        sid = session.session_id
        if session.active:
            self.active_count += 1
        if session.gpu_id is None:
            if session.active:
                self.waiting[sid] = None
            return
        residents = self.residents[session.gpu_id]
        residents[sid] = None
        self._shift_level(session.gpu_id, len(residents) - 1, len(residents))
        if session.active:
            self.active_on[session.gpu_id] += 1
        else:
            self.idle_resident[sid] = None

    def _unindex(self, session: SessionView) -> None:
        sid = session.session_id
        if session.active:
            self.active_count -= 1
        if session.gpu_id is None:
            self.waiting.pop(sid, None)
            return
        residents = self.residents[session.gpu_id]
        del residents[sid]
        self._shift_level(session.gpu_id, len(residents) + 1, len(residents))
        if session.active:
            self.active_on[session.gpu_id] -= 1
        else:
            self.idle_resident.pop(sid, None)

