"""Where a new or resuming session goes: a pure choice by predicted per-chunk latency, with its reason.

This is the interim placement rule of the walking system; the closed-loop policy (services/scheduler/policy)
replaces it by being passed to the Coordinator as ``place`` with the same signature.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

LatencyModel = Callable[[int, int], float]
"""Predicted per-chunk latency in ms of a worker running ``sessions`` of its ``capacity`` at once."""

BASE_LATENCY_MS = 180.0
PER_SESSION_LATENCY_MS = 55.0
CONTENTION_LATENCY_MS = 18.0


def reference_latency_ms(sessions: int, capacity: int) -> float:
    """The paper's reference model l(n) = 180 ms + 55 ms (n - 1) + 18 ms (n / K)^2."""
    if sessions < 1 or capacity < 1:
        raise ValueError(f"latency is defined for sessions >= 1 and capacity >= 1, got {sessions} and {capacity}")
    contention_ms = CONTENTION_LATENCY_MS * (sessions / capacity) ** 2
    return BASE_LATENCY_MS + PER_SESSION_LATENCY_MS * (sessions - 1) + contention_ms


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """A worker as placement sees it; ``active_sessions`` counts the active sessions placed on it.

    Idle sessions are not counted: they keep their state on the worker but use no compute, and the
    latency model prices compute sharing.
    """

    worker_id: str
    model: str
    capacity: int
    active_sessions: int
    live: bool
    draining: bool = False


@dataclass(frozen=True, slots=True)
class PlacementChoice:
    """The chosen worker (None when nothing fits) and why, in words a log line can carry verbatim."""

    worker_id: str | None
    predicted_latency_ms: float | None
    reason: str


class PlacementRule(Protocol):
    """The seam the closed-loop policy plugs into: workers and a model in, one choice with its reason out."""

    def __call__(self, workers: Iterable[WorkerLoad], *, model: str) -> PlacementChoice: ...


def choose_worker(
    workers: Iterable[WorkerLoad], *, model: str, latency_ms: LatencyModel = reference_latency_ms
) -> PlacementChoice:
    """The live, non-draining worker of ``model`` with room whose latency after taking one more session,
    l(n + 1), is lowest; ties go to the lighter worker, then to the smaller id, so the choice is deterministic."""
    serving = [w for w in workers if w.live and w.model == model]
    if not serving:
        return PlacementChoice(None, None, f"no live worker serves model {model!r}")
    open_workers = [w for w in serving if not w.draining and w.active_sessions < w.capacity]
    if not open_workers:
        return PlacementChoice(
            None, None, f"all {len(serving)} live workers of model {model!r} are full or draining"
        )
    ranked = sorted(
        open_workers, key=lambda w: (latency_ms(w.active_sessions + 1, w.capacity), w.active_sessions, w.worker_id)
    )
    best = ranked[0]
    predicted_ms = latency_ms(best.active_sessions + 1, best.capacity)
    return PlacementChoice(
        best.worker_id,
        predicted_ms,
        f"lowest predicted latency {predicted_ms:.1f} ms with {best.active_sessions + 1}/{best.capacity} sessions "
        f"on {best.worker_id} among {len(open_workers)} workers with room",
    )
