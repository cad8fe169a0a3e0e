"""Workload detector: a sliding window over the active count and the session inflow/outflow, bucketed into levels.

Volatility is how far the inflow of the last ``recent_s`` strays from the window's rate, in Poisson standard
deviations: steady traffic reads about 1, a burst reads several. The level picks the paper's (lambda, rho)
and how long the autoscaler waits before giving GPUs back. Levels are fixed offline, never fitted per trace.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class DetectorError(ValueError):
    """Bad detector configuration (empty level list, non-positive windows)."""


@dataclass(frozen=True, slots=True)
class LevelParams:
    """What a workload level means to the controllers.

    ``latency_weight`` is the paper's lambda (larger: a rebalance pays off for smaller gains), ``rho`` the
    target utilisation the paper's rule uses, ``scale_in_hold_s`` how long fewer GPUs must suffice before any
    is released. ``max_volatility`` is the upper edge of the level. (Our autoscaler's headroom comes from the
    burst memory and the violation budget instead: a fixed per-level coefficient cannot know how bursty a
    workload is.)
    """

    name: str
    max_volatility: float
    latency_weight: float
    rho: float
    scale_in_hold_s: float


DEFAULT_LEVELS: tuple[LevelParams, ...] = (
    LevelParams("stable", 1.5, 1.0, 0.95, 15.0),
    LevelParams("moderate", 3.0, 1.0, 0.9, 30.0),
    LevelParams("volatile", math.inf, 0.5, 0.8, 60.0),
)


@dataclass(frozen=True, slots=True)
class WorkloadReading:
    """The detector's view at one instant; rates are per second over the window, ``now_s`` when it was taken.
    ``headroom_scale`` is the share of its burst headroom the violation budget lets the autoscaler keep (see
    ``budget``); the detector leaves it at 1 and the controller fills it in."""

    level: LevelParams
    active: int
    inflow_per_s: float
    outflow_per_s: float
    volatility: float
    headroom_scale: float = 1.0
    now_s: float = 0.0


class WorkloadDetector:
    """Feeds on the snapshot's monotonic counters, so it sees every transition even between decisions."""

    def __init__(
        self,
        window_s: float = 300.0,
        recent_s: float = 30.0,
        levels: tuple[LevelParams, ...] = DEFAULT_LEVELS,
    ) -> None:
        if window_s <= 0 or recent_s <= 0 or not levels:
            raise DetectorError(
                f"windows must be positive and levels non-empty (window_s={window_s}, recent_s={recent_s})"
            )
        self.window_s, self.recent_s = window_s, recent_s
        self.levels = levels
        self._window: deque[tuple[float, int, int]] = deque()
        self._recent: deque[tuple[float, int, int]] = deque()
        self._rebase: tuple[list[tuple[float, int, int]], list[tuple[float, int, int]]] | None = None

    def learnt(self, now_s: float) -> dict[str, Any]:
        """The windows' samples as [age s, inflow, outflow], the counters taken from the last sample's (zero or
        less): a successor's counters start from its own first snapshot, so only differences carry over."""
        last = self._window[-1] if self._window else (now_s, 0, 0)
        return {name: [[now_s - at_s, inflow - last[1], outflow - last[2]] for at_s, inflow, outflow in samples]
                for name, samples in (("window", self._window), ("recent", self._recent))}

    def relearn(self, state: Mapping[str, Any], at_s: float) -> None:
        """Take back ``learnt``'s samples as of ``at_s``; the first ``update`` puts them under its counters. All of
        it or nothing (ValueError, TypeError or KeyError)."""
        def samples(rows: Any) -> list[tuple[float, int, int]]:
            taken = [(at_s - float(age_s), int(inflow), int(outflow)) for age_s, inflow, outflow in rows]
            ages = [float(row[0]) for row in rows]
            if any(not math.isfinite(a) or a < 0 for a in ages) or ages != sorted(ages, reverse=True):
                raise ValueError(f"detector samples must have finite ages, oldest first: {ages[:5]}")
            if any(inflow > 0 or outflow > 0 for _, inflow, outflow in taken):
                raise ValueError("detector counters must be taken from the last sample's")
            return taken

        self._rebase = (samples(state["window"]), samples(state["recent"]))

    def _rates(
        self, samples: deque[tuple[float, int, int]], horizon_s: float, now_s: float, inflow_total: int,
        outflow_total: int,
    ) -> tuple[float, float]:
        """Rates over ``horizon_s``, keeping one sample at or before its start so the span covers it. A rate is
        never read off less than ``recent_s`` of history: just after a scheduler starts, one arrival a second in
        would read as a rate of one a second, and the sizing would ask for a whole horizon's worth of them (the
        first session on a fresh system asked for seven GPUs)."""
        samples.append((now_s, inflow_total, outflow_total))
        while len(samples) > 2 and samples[1][0] <= now_s - horizon_s:
            samples.popleft()
        first_s, first_in, first_out = samples[0]
        span_s = max(now_s - first_s, min(self.recent_s, horizon_s))
        return (inflow_total - first_in) / span_s, (outflow_total - first_out) / span_s

    def update(self, now_s: float, active: int, inflow_total: int, outflow_total: int) -> WorkloadReading:
        """Record the counters at ``now_s`` (monotonic totals of arrivals+activations, and of deactivations)."""
        if self._rebase is not None:  # what a predecessor saw, under this process's counters
            (window, recent), self._rebase = self._rebase, None
            self._window = deque((t, inflow_total + i, outflow_total + o) for t, i, o in window if t < now_s)
            self._recent = deque((t, inflow_total + i, outflow_total + o) for t, i, o in recent if t < now_s)
        inflow, outflow = self._rates(self._window, self.window_s, now_s, inflow_total, outflow_total)
        recent_inflow, _ = self._rates(self._recent, self.recent_s, now_s, inflow_total, outflow_total)
        expected = inflow * self.recent_s
        volatility = abs(recent_inflow - inflow) * self.recent_s / math.sqrt(expected + 1.0)
        level = next(lv for lv in self.levels if volatility <= lv.max_volatility)
        return WorkloadReading(level, active, inflow, outflow, volatility, now_s=now_s)
