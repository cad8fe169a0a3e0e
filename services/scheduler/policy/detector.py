"""Workload detector: a sliding window over the active count and the session inflow/outflow, bucketed into levels.

Volatility is the rate of active/idle transitions per active session; the level picks how much headroom the
autoscaler keeps and how long it waits before giving GPUs back. Levels are fixed offline, never fitted per trace.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


class DetectorError(ValueError):
    """Bad detector configuration (empty level list, non-positive window)."""


@dataclass(frozen=True, slots=True)
class LevelParams:
    """What a workload level means to the controllers.

    ``latency_weight`` is the paper's lambda (larger: a rebalance pays off for smaller gains), ``rho`` the
    target utilisation the paper's rule uses, ``headroom_z`` how many standard deviations of inflow over the
    provisioning horizon our autoscaler keeps spare, ``scale_in_hold_s`` how long fewer GPUs must suffice before
    any is released. ``max_volatility_per_min`` is the upper edge of the level.
    """

    name: str
    max_volatility_per_min: float
    latency_weight: float
    rho: float
    headroom_z: float
    scale_in_hold_s: float


DEFAULT_LEVELS: tuple[LevelParams, ...] = (
    LevelParams("stable", 0.5, 1.0, 0.95, 2.5, 60.0),
    LevelParams("moderate", 2.0, 1.0, 0.9, 3.0, 90.0),
    LevelParams("volatile", math.inf, 0.5, 0.8, 3.5, 120.0),
)


@dataclass(frozen=True, slots=True)
class WorkloadReading:
    """The detector's view at one instant; rates are per second over the window."""

    level: LevelParams
    active: int
    inflow_per_s: float
    outflow_per_s: float
    volatility_per_min: float
    peak_active: int


class WorkloadDetector:
    """Feeds on the snapshot's monotonic counters, so it sees every transition even between decisions."""

    def __init__(self, window_s: float = 300.0, levels: tuple[LevelParams, ...] = DEFAULT_LEVELS) -> None:
        if window_s <= 0 or not levels:
            raise DetectorError(f"window_s must be positive and levels non-empty (window_s={window_s})")
        self.window_s = window_s
        self.levels = levels
        self._samples: deque[tuple[float, int, int, int]] = deque()
        self._active_peaks: deque[tuple[float, int]] = deque()
        self._active_area = 0.0
        self._last_active: tuple[float, int] | None = None

    def update(self, now_s: float, active: int, inflow_total: int, outflow_total: int) -> WorkloadReading:
        """Record the counters at ``now_s`` (monotonic totals of arrivals+activations, deactivations)."""
        self._samples.append((now_s, active, inflow_total, outflow_total))
        while len(self._samples) > 1 and self._samples[1][0] <= now_s - self.window_s:
            self._samples.popleft()
        while self._active_peaks and self._active_peaks[-1][1] <= active:
            self._active_peaks.pop()
        self._active_peaks.append((now_s, active))
        while self._active_peaks[0][0] <= now_s - self.window_s:
            self._active_peaks.popleft()
        first_s, _, first_in, first_out = self._samples[0]
        span_s = max(now_s - first_s, 1.0)
        inflow = (inflow_total - first_in) / span_s
        outflow = (outflow_total - first_out) / span_s
        volatility = 60.0 * (inflow + outflow) / max(active, 1)
        level = next(lv for lv in self.levels if volatility <= lv.max_volatility_per_min)
        return WorkloadReading(level, active, inflow, outflow, volatility, self._active_peaks[0][1])
