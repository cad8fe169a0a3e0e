"""A forecaster that knows the workload's statistics: the reference between the clairvoyant pool and a causal policy.

The clairvoyant bound knows every arrival, so what a causal policy pays beyond it mixes two prices: not knowing
how much the load will rise (its distribution), and not knowing which of those rises comes (the draw). No policy
can avoid the second. To price it apart, this forecaster is told, at every second, the distribution of the rise
of the active count over the provisioning horizon, read from other replications of the same trace (the same
sessions shifted by other seeds: the same rate, other draws), and sizes ours' pool to a quantile of it.

What it pays at the cheapest quantile that keeps chunks within the violation budget is what sizing alone can
reach with perfect knowledge of the load's statistics; whatever target lies below it asks for knowing the draw.
It is a reference for the benchmarks, never a live policy: it reads the future.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from services.scheduler.policy.autoscale import AutoscaleError, check_bounds, headroom_pool
from services.scheduler.policy.detector import WorkloadReading
from services.scheduler.sim.trace import Trace

POOL_S = 60
"""Rises within this many seconds either side of a moment count towards its quantile: a few dozen replications
alone give too few draws for a tail, and the rate hardly changes within two minutes."""

_ROWS_PER_SLICE = 2048  # seconds of the window whose quantiles are taken at once (bounds the memory of a day)


class ForecastError(ValueError):
    """A forecast that cannot be made: no replication, a quantile outside (0, 1), a non-positive horizon."""


def active_counts(trace: Trace, start_s: int, seconds: int) -> np.ndarray:
    """The active count at each whole second from ``start_s``, ``seconds`` of them."""
    steps = trace.active_steps()
    grid = start_s + np.arange(seconds, dtype=np.float64)
    if not steps:
        return np.zeros(seconds, dtype=np.int64)
    times = np.array([time_s for time_s, _ in steps])
    running = np.cumsum([delta for _, delta in steps])
    index = np.searchsorted(times, grid, side="right")
    return np.where(index > 0, running[np.maximum(index - 1, 0)], 0)


def rises(counts: np.ndarray, horizon_s: int) -> np.ndarray:
    """At each second, the highest count within the next ``horizon_s`` seconds less the count now (never
    negative: the count itself is in its window)."""
    padded = np.concatenate([counts, np.full(horizon_s, counts[-1] if len(counts) else 0)])
    rise: np.ndarray = sliding_window_view(padded, horizon_s + 1)[: len(counts)].max(axis=1) - counts
    return rise


@dataclass(frozen=True, slots=True)
class RiseForecast:
    """The ``quantile`` of the rise over ``horizon_s`` at each second from ``start_s``; before and after, the
    nearest second's."""

    start_s: int
    horizon_s: int
    quantile: float
    per_second: np.ndarray

    def rise_at(self, now_s: float) -> float:
        index = min(max(math.floor(now_s) - self.start_s, 0), len(self.per_second) - 1)
        return float(self.per_second[index])


def forecast_rises(replications: Sequence[Trace], horizon_s: float, quantiles: Sequence[float],
                   pool_s: int = POOL_S) -> dict[float, RiseForecast]:
    """Each quantile's forecast from the replications' rises, pooled over ``pool_s`` either side of each second.
    Quantiles are of drawn rises (whole sessions), never between two."""
    if not replications:
        raise ForecastError("a forecast needs at least one replication of the trace")
    if horizon_s <= 0 or pool_s < 0 or not all(0 < q < 1 for q in quantiles):
        raise ForecastError(f"need horizon_s > 0, pool_s >= 0, quantiles in (0, 1), got {horizon_s}, {pool_s}, "
                            f"{list(quantiles)}")
    horizon = math.ceil(horizon_s)
    earliest_s = min(min([t.window_start_s, *(s.active_periods[0][0] for s in t.sessions)]) for t in replications)
    start_s = math.floor(earliest_s) - horizon  # a horizon before anything, so a rise from nothing is forecast too
    end_s = math.ceil(max(t.window_end_s for t in replications))
    seconds = max(end_s - start_s, 1)
    drawn = np.stack([rises(active_counts(trace, start_s, seconds), horizon) for trace in replications])
    padded = np.pad(drawn, ((0, 0), (pool_s, pool_s)), mode="edge")
    windows = sliding_window_view(padded, 2 * pool_s + 1, axis=1)  # (replication, second, pooled)
    draws_per_second = drawn.shape[0] * (2 * pool_s + 1)
    tables = np.empty((len(quantiles), seconds))
    for first in range(0, seconds, _ROWS_PER_SLICE):
        pooled = windows[:, first:first + _ROWS_PER_SLICE].transpose(1, 0, 2).reshape(-1, draws_per_second)
        tables[:, first:first + len(pooled)] = np.quantile(pooled, list(quantiles), axis=1, method="inverted_cdf")
    return {q: RiseForecast(start_s, horizon, q, tables[i]) for i, q in enumerate(quantiles)}


class ForecastHeadroom:
    """Ours' sizing with its burst headroom told by a ``RiseForecast`` instead of learnt from the past: room for
    the active sessions plus the forecast rise, at least ``spare_gpus`` beyond those the active sessions fill (as
    ours keeps, so the first-chunk rule costs the same), scale-in after the level's hold (as ours)."""

    hold_s: float | None = None

    def __init__(self, forecast: RiseForecast, min_gpus: int, max_gpus: int, spare_gpus: int = 1) -> None:
        check_bounds(min_gpus, max_gpus)
        if spare_gpus < 0:
            raise AutoscaleError(f"spare_gpus must not be negative, got {spare_gpus}")
        self.name = f"forecast_q{forecast.quantile:g}"
        self.forecast = forecast
        self.min_gpus, self.max_gpus, self.spare_gpus = min_gpus, max_gpus, spare_gpus

    def target_gpus(self, reading: WorkloadReading, capacity: int) -> tuple[int, str]:
        rise = self.forecast.rise_at(reading.now_s)
        count = headroom_pool(reading.active + rise, reading.active, capacity, self.spare_gpus, self.min_gpus,
                              self.max_gpus)
        return count, f"{reading.active} active, forecast rise {rise:g} (q {self.forecast.quantile:g}) -> {count} GPUs"
