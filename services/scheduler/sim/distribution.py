"""Per-chunk latency as a weighted distribution: point masses (a GPU level's constant latency times the chunks
it produced) plus uniform ranges (the chunks a waiting session owed, late by 0..W). Exact, and independent of
how many chunks there were: 24 h at 256 sessions is tens of millions of chunks but a few thousand entries.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


class LatencyDistribution:
    """Accumulates chunk latencies (ms) with weights; quantiles and tail fractions are computed exactly."""

    def __init__(self) -> None:
        self._points: defaultdict[float, float] = defaultdict(float)
        self._ranges: list[tuple[float, float, float]] = []
        self.worst_ms = 0.0

    def add_point(self, latency_ms: float, chunks: float) -> None:
        if chunks == 0:
            return
        self._points[latency_ms] += chunks
        if chunks > 0:
            self.worst_ms = max(self.worst_ms, latency_ms)

    def add_range(self, low_ms: float, high_ms: float, chunks: float) -> None:
        """``chunks`` spread evenly over [low_ms, high_ms]."""
        if chunks <= 0:
            return
        if high_ms <= low_ms:
            self.add_point(low_ms, chunks)
            return
        self._ranges.append((low_ms, high_ms, chunks))
        self.worst_ms = max(self.worst_ms, high_ms)

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        points = np.array(sorted(self._points.items()), dtype=float).reshape(-1, 2)
        ranges = np.array(self._ranges, dtype=float).reshape(-1, 3)
        return points, ranges, np.array([points[:, 1].sum() + ranges[:, 2].sum()])

    @property
    def total_chunks(self) -> float:
        return float(self._arrays()[2][0])

    def fraction_above(self, threshold_ms: float) -> float:
        points, ranges, total = self._arrays()
        if total[0] <= 0:
            return 0.0
        return self._mass_above(points, ranges, threshold_ms) / float(total[0])

    @staticmethod
    def _mass_above(points: np.ndarray, ranges: np.ndarray, threshold_ms: float) -> float:
        above = float(points[points[:, 0] > threshold_ms, 1].sum())
        if len(ranges):
            low, high, weight = ranges[:, 0], ranges[:, 1], ranges[:, 2]
            share = np.clip((high - threshold_ms) / (high - low), 0.0, 1.0)
            above += float((share * weight).sum())
        return above

    def quantile_ms(self, q: float) -> float:
        """The latency below which a share ``q`` of chunks fall (bisection on the exact CDF)."""
        points, ranges, total = self._arrays()
        if total[0] <= 0:
            return 0.0
        allowed = (1.0 - q) * float(total[0])
        low, high = 0.0, max(self.worst_ms, 1.0)
        for _ in range(60):
            middle = (low + high) / 2
            if self._mass_above(points, ranges, middle) > allowed:
                low = middle
            else:
                high = middle
        return high
