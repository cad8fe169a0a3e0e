"""Session traces: each session's active periods and departure, the events they imply, load scaling by
replication with random time shifts, the busiest window, and the offline lower bound on GPU cost."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from enum import IntEnum


class TraceError(ValueError):
    """A trace that cannot be replayed: overlapping or reversed periods, departure before the last period."""


class EventKind(IntEnum):
    """Ordered so that at equal times a session goes idle or leaves before another arrives or resumes."""

    IDLE = 0
    DEPART = 1
    ARRIVE = 2
    ACTIVE = 3


@dataclass(frozen=True, slots=True)
class SessionTrace:
    """One session: sorted, disjoint active periods (start_s, end_s); it arrives active at the first start."""

    session_id: str
    active_periods: tuple[tuple[float, float], ...]
    departure_s: float
    state_bytes: int

    def __post_init__(self) -> None:
        if not self.active_periods:
            raise TraceError(f"session {self.session_id!r} has no active period")
        previous_end = -math.inf
        for start_s, end_s in self.active_periods:
            if not previous_end <= start_s < end_s:
                raise TraceError(f"session {self.session_id!r}: bad period ({start_s}, {end_s})")
            previous_end = end_s
        if self.departure_s < previous_end:
            raise TraceError(f"session {self.session_id!r} departs at {self.departure_s} before its last period ends")

    def shifted(self, offset_s: float, session_id: str) -> SessionTrace:
        periods = tuple((a + offset_s, b + offset_s) for a, b in self.active_periods)
        return replace(self, session_id=session_id, active_periods=periods, departure_s=self.departure_s + offset_s)


@dataclass(frozen=True, slots=True)
class Trace:
    """Sessions plus the measurement window; ``assumptions`` are the named conversion parameters, printed
    with every result so two runs are only compared when they agree."""

    name: str
    sessions: tuple[SessionTrace, ...]
    window_start_s: float
    window_end_s: float
    assumptions: dict[str, float | str] = field(default_factory=dict)

    @property
    def window_s(self) -> float:
        return self.window_end_s - self.window_start_s

    def events(self) -> list[tuple[float, int, str]]:
        """(time_s, EventKind, session_id), time ordered; ties resolved by EventKind then session id."""
        events: list[tuple[float, int, str]] = []
        for session in self.sessions:
            sid = session.session_id
            first = True
            for start_s, end_s in session.active_periods:
                events.append((start_s, EventKind.ARRIVE if first else EventKind.ACTIVE, sid))
                events.append((end_s, EventKind.IDLE, sid))
                first = False
            events.append((session.departure_s, EventKind.DEPART, sid))
        events.sort()
        return events

    def active_steps(self) -> list[tuple[float, int]]:
        """(time_s, change in active count), time ordered."""
        steps = [(a, 1) for s in self.sessions for a, _ in s.active_periods]
        steps += [(b, -1) for s in self.sessions for _, b in s.active_periods]
        steps.sort()
        return steps

    def mean_active(self) -> float:
        return active_time_in(self, self.window_start_s, self.window_end_s) / max(self.window_s, 1e-9)

    def peak_active(self) -> int:
        active = peak = 0
        for time_s, delta in self.active_steps():
            active += delta
            if self.window_start_s <= time_s <= self.window_end_s:
                peak = max(peak, active)
        return peak


def active_time_in(trace: Trace, start_s: float, end_s: float) -> float:
    return sum(
        max(0.0, min(b, end_s) - max(a, start_s)) for session in trace.sessions for a, b in session.active_periods
    )


def _needed_gpus(trace: Trace, capacity: int, min_gpus: int) -> list[tuple[float, float, int]]:
    """The window as (start_s, end_s, max(min_gpus, ceil(N_active / K))) steps."""
    steps: list[tuple[float, float, int]] = []
    active = 0
    last_s = trace.window_start_s
    for time_s, delta in trace.active_steps():
        clipped_s = min(max(time_s, trace.window_start_s), trace.window_end_s)
        if clipped_s > last_s:
            steps.append((last_s, clipped_s, max(min_gpus, math.ceil(active / capacity))))
        last_s = clipped_s
        active += delta
    if trace.window_end_s > last_s:
        steps.append((last_s, trace.window_end_s, max(min_gpus, math.ceil(active / capacity))))
    return steps


def lower_bound_gpu_hours(trace: Trace, capacity: int, min_gpus: int) -> float:
    """Integral over the window of max(min_gpus, ceil(N_active(t) / K)) dt, in GPU-hours."""
    return sum((end_s - start_s) * needed for start_s, end_s, needed in _needed_gpus(trace, capacity, min_gpus)) / 3600


def clairvoyant_gpu_hours(trace: Trace, capacity: int, min_gpus: int, provisioning_delay_s: float) -> float:
    """The least any policy pays that never lets a chunk wait, knowing the whole future, when a GPU is billed
    from the moment it is asked for and serves ``provisioning_delay_s`` later (migrations free, packing perfect).

    GPUs are interchangeable, so the cost splits by level: the k-th GPU is needed while ceil(N/K) >= k. Each
    stretch of need is paid whole; a gap between two is paid across where it is shorter than the delay (keeping
    the GPU is cheaper than asking again) and otherwise costs the delay once more; the first stretch costs the
    delay unless the window opens on it. The ratio of this to ``lower_bound_gpu_hours`` is how far the plain lower
    bound is from reachable at all; what a causal policy pays beyond this is the price of not knowing the future.
    """
    steps = _needed_gpus(trace, capacity, min_gpus)
    total_s = 0.0
    for level in range(1, max((needed for *_, needed in steps), default=0) + 1):
        previous_end_s: float | None = None
        for start_s, end_s, needed in steps:
            if needed < level:
                continue
            total_s += end_s - start_s
            if previous_end_s is None:
                total_s += 0.0 if start_s <= trace.window_start_s else provisioning_delay_s
            elif start_s > previous_end_s:
                total_s += min(start_s - previous_end_s, provisioning_delay_s)
            previous_end_s = end_s
    return total_s / 3600.0


def busiest_window(trace: Trace, window_s: float, step_s: float = 3600.0) -> Trace:
    """The sub-window of ``window_s`` (start on a ``step_s`` grid) with the most active session-time; sessions
    that never overlap it plus a lead-in of ``step_s`` are dropped."""
    if trace.window_s <= window_s:
        return trace
    starts = [trace.window_start_s + i * step_s for i in range(int((trace.window_s - window_s) // step_s) + 1)]
    best_start = max(starts, key=lambda s: active_time_in(trace, s, s + window_s))
    end_s = best_start + window_s
    kept = tuple(s for s in trace.sessions if s.departure_s >= best_start - step_s and s.active_periods[0][0] <= end_s)
    assumptions = {**trace.assumptions, "busiest_window_s": window_s, "busiest_window_start_s": best_start}
    return Trace(trace.name, kept, best_start, end_s, assumptions)


def scale_to_mean_active(trace: Trace, target_mean_active: float, shift_s: float = 600.0, seed: int = 0) -> Trace:
    """Replicate sessions (each copy shifted uniformly within +-shift_s, fixed seed) until the time-averaged
    active count over the window is about ``target_mean_active``; keeps the daily pattern."""
    base = trace.mean_active()
    if base <= 0 or target_mean_active <= 0:
        raise TraceError(f"cannot scale a trace with mean active {base} to {target_mean_active}")
    factor = target_mean_active / base
    rng = random.Random(seed)
    copies: list[SessionTrace] = []
    for session in trace.sessions:
        count = int(factor) + (1 if rng.random() < factor - int(factor) else 0)
        for copy in range(count):
            copies.append(session.shifted(rng.uniform(-shift_s, shift_s), f"{session.session_id}#{copy}"))
    assumptions = {**trace.assumptions, "target_mean_active": target_mean_active, "replication_shift_s": shift_s,
                   "replication_seed": seed}
    return Trace(trace.name, tuple(copies), trace.window_start_s, trace.window_end_s, assumptions)
