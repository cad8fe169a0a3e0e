"""Burst memory: how far the active count has risen within one provisioning horizon, as seen so far.

A GPU asked for now serves only after the horizon, so the spare slots must cover the rise of the active count
over that horizon. How large those rises get is a property of the workload (how its arrivals clump), not of
its size, and no rate or level figure shows it; the history does. Each rise is measured once its horizon has
passed (so only the past is used), normalised by the square root of the load it started from (Poisson rises
grow like that, so the normalised tail compares across loads and across the day), and kept in a histogram
that forgets over ``window_s``. The autoscaler reads a high quantile of it as its headroom coefficient.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


class BurstMemoryError(ValueError):
    """Bad burst memory configuration (non-positive horizon or window, a quantile outside (0, 1))."""


@dataclass(frozen=True, slots=True)
class BurstParams:
    """``quantile``: which tail of the time-weighted rises is covered; ``prior_z`` and ``prior_s``: the
    coefficient assumed before any rise is seen, blended in as ``prior_s`` seconds of history; ``starts_per_horizon``:
    how many rises are followed at once (more: finer, slower); ``bin_z``/``max_z``: histogram resolution."""

    horizon_s: float = 40.0
    window_s: float = 6 * 3600.0
    quantile: float = 0.99
    prior_z: float = 3.0
    prior_s: float = 600.0
    starts_per_horizon: int = 8
    bin_z: float = 0.1
    max_z: float = 12.0

    def __post_init__(self) -> None:
        if self.horizon_s <= 0 or self.window_s <= 0 or self.prior_s <= 0 or self.starts_per_horizon < 1:
            raise BurstMemoryError(
                f"horizon_s, window_s, prior_s and starts_per_horizon must be positive, got {self.horizon_s}, "
                f"{self.window_s}, {self.prior_s}, {self.starts_per_horizon}"
            )
        if not 0 < self.quantile < 1 or self.bin_z <= 0 or self.max_z < self.prior_z:
            raise BurstMemoryError(
                f"need 0 < quantile < 1, bin_z > 0, max_z >= prior_z, got {self.quantile}, {self.bin_z}, "
                f"{self.max_z}, {self.prior_z}"
            )


@dataclass(slots=True)
class _Rise:
    start_s: float
    start_active: int
    peak_active: int
    weight_s: float


class BurstMemory:
    """Feed it the active count at every decision (``record``); ``rise_z`` is the coefficient to staff with."""

    def __init__(self, params: BurstParams | None = None) -> None:
        self.params = params or BurstParams()
        self._bins = [0.0] * (math.ceil(self.params.max_z / self.params.bin_z) + 1)
        self._total_s = 0.0
        self._open: deque[_Rise] = deque()
        self._last_s: float | None = None

    def _bin(self, z: float) -> int:
        return min(int(z / self.params.bin_z), len(self._bins) - 1)

    def record(self, now_s: float, active: int) -> None:
        """Raise the peak of every open rise, close those whose horizon has passed, open one per step."""
        params = self.params
        while self._open and now_s - self._open[0].start_s > params.horizon_s:
            self._close(self._open.popleft(), now_s)
        for rise in self._open:
            rise.peak_active = max(rise.peak_active, active)
        step_s = params.horizon_s / params.starts_per_horizon
        if self._last_s is None or now_s - self._last_s >= step_s:
            weight_s = step_s if self._last_s is None else min(now_s - self._last_s, params.horizon_s)
            self._open.append(_Rise(now_s, active, active, weight_s))
            self._last_s = now_s

    def _close(self, rise: _Rise, now_s: float) -> None:
        """Forget old weight in proportion to the time passed since the last close, then add this rise."""
        keep = math.exp(-rise.weight_s / self.params.window_s)
        self._bins = [weight * keep for weight in self._bins]
        self._total_s = self._total_s * keep + rise.weight_s
        z = (rise.peak_active - rise.start_active) / math.sqrt(max(rise.start_active, 1))
        self._bins[self._bin(z)] += rise.weight_s

    @property
    def rise_z(self) -> float:
        """The ``quantile`` of the normalised rises seen (upper bin edge, so it never under-reads), blended
        with ``prior_z`` by weight: the prior counts as ``prior_s`` seconds of history."""
        params = self.params
        observed = 0.0
        tail = (1.0 - params.quantile) * self._total_s
        seen = 0.0
        for index in range(len(self._bins) - 1, -1, -1):
            seen += self._bins[index]
            if seen > tail:
                observed = (index + 1) * params.bin_z
                break
        return (params.prior_s * params.prior_z + self._total_s * observed) / (params.prior_s + self._total_s)
