"""Burst memory: how far the active count has risen within one provisioning horizon, as seen so far, per load.

A GPU asked for now serves only after the horizon, so the spare slots must cover the rise of the active count
over that horizon. How large those rises get is a property of the workload (how its arrivals clump), not of
its size, and no rate or level figure shows it; the history does. Each rise is measured once its horizon has
passed (so only the past is used), normalised by the square root of the load it started from (Poisson rises
grow like that, so the normalised tail compares across loads), and kept in a histogram that forgets over
``window_s``.

One histogram per band of starting load (powers of two), because the normalised tail is not the same at every
load: at night a handful of sessions can be joined by a clump of ten within a minute (a z of 5 or more), while
by day hundreds of independent users rise by about two standard deviations. A single histogram for the whole day
staffs the daytime pool for the night's clumps. A band reads its own tail, blended with the tail of all bands
as its prior for as long as it has little history of its own.

An empty pool is the exception. There every arrival is a rise, and the silence between clumps (minutes to hours
of rises of nothing) dilutes a time-weighted tail until it reads a single GPU, so the clump that ends a lull
waits out the provisioning delay: on RAGPulse at load 256 the active count fell to none for 10 and 25 minutes
and came back as 14 sessions in 30 s, and the first of them waited 9 to 13 s for a chunk. So the memory also
keeps the largest clump seen from empty within the window (``clump_room``), from the moment the pool empties
until a horizon after it last was empty, since that is the span the clump was measured over. It keeps the whole
of it: the burst coverage was chosen on synthetic days that never empty, and its share of a 10-session clump left
the 37 that ended a later lull waiting 8.5 s. That room is paid for only around the lulls, when the pool is at its
smallest anyway.

``RecentRises`` is the plainer sibling a candidate sizing reads: the raw rises of the last half hour, no bands,
no normalising, no memory of clumps from empty (``autoscale.RecentRiseHeadroom`` says why it is measured).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class BurstMemoryError(ValueError):
    """Bad burst memory configuration (non-positive horizon or window, a quantile outside (0, 1))."""


@dataclass(frozen=True, slots=True)
class BurstParams:
    """``quantile``: which tail of the time-weighted rises is covered; ``prior_z`` and ``prior_s``: the
    coefficient assumed before any rise is seen, blended in as ``prior_s`` seconds of history (a load band
    blends the all-band tail in the same way); ``starts_per_horizon``: how many rises are followed at once
    (more: finer, slower); ``bin_z``/``max_z``: histogram resolution."""

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


class _OpenRises:
    """The rises being followed: one started every ``step_s`` (weighted by the time since the last, at most a
    horizon), its peak raised while its ``horizon_s`` lasts, handed back once it has passed, so only the past is
    ever read."""

    def __init__(self, horizon_s: float, step_s: float) -> None:
        self.horizon_s, self.step_s = horizon_s, step_s
        self._open: deque[_Rise] = deque()
        self._last_s: float | None = None

    def learnt(self, now_s: float) -> dict[str, Any]:
        return {"open": [[now_s - r.start_s, r.start_active, r.peak_active, r.weight_s] for r in self._open],
                "last_age_s": None if self._last_s is None else now_s - self._last_s}

    def relearn(self, state: Mapping[str, Any], at_s: float) -> None:
        self._open = deque(_Rise(at_s - float(age), int(start), int(peak), float(weight))
                           for age, start, peak, weight in state["open"])
        self._last_s = None if state["last_age_s"] is None else at_s - float(state["last_age_s"])

    def record(self, now_s: float, active: int) -> list[_Rise]:
        """The rises whose horizon has passed by ``now_s``, oldest first; the others see ``active``."""
        closed = []
        while self._open and now_s - self._open[0].start_s > self.horizon_s:
            closed.append(self._open.popleft())
        for rise in self._open:
            rise.peak_active = max(rise.peak_active, active)
        if self._last_s is None or now_s - self._last_s >= self.step_s:
            weight_s = self.step_s if self._last_s is None else min(now_s - self._last_s, self.horizon_s)
            self._open.append(_Rise(now_s, active, active, weight_s))
            self._last_s = now_s
        return closed


class _Histogram:
    """Time-weighted normalised rises, forgotten exponentially over ``window_s`` (lazily, on each touch)."""

    def __init__(self, params: BurstParams) -> None:
        self.params = params
        self.bins = [0.0] * (math.ceil(params.max_z / params.bin_z) + 1)
        self.total_s = 0.0
        self._at_s = -math.inf  # times may be negative (the simulator's warm-up runs before 0)

    def _forget(self, now_s: float) -> None:
        if now_s > self._at_s:
            keep = math.exp(-(now_s - self._at_s) / self.params.window_s)
            self.bins = [weight * keep for weight in self.bins]
            self.total_s *= keep
            self._at_s = now_s

    def learnt(self, now_s: float) -> dict[str, Any]:
        self._forget(now_s)
        return {"bins": list(self.bins), "total_s": self.total_s}

    def relearn(self, state: Mapping[str, Any], at_s: float) -> None:
        bins = [float(weight) for weight in state["bins"]]
        if len(bins) != len(self.bins):
            raise BurstMemoryError(f"a histogram of {len(bins)} bins, where this memory keeps {len(self.bins)}")
        self.bins, self.total_s, self._at_s = bins, float(state["total_s"]), at_s

    def add(self, now_s: float, z: float, weight_s: float) -> None:
        self._forget(now_s)
        self.bins[min(int(z / self.params.bin_z), len(self.bins) - 1)] += weight_s
        self.total_s += weight_s

    def tail(self, now_s: float) -> tuple[float, float]:
        """(the ``quantile`` of the rises, upper bin edge so it never under-reads; their weight in seconds)."""
        self._forget(now_s)
        tail = (1.0 - self.params.quantile) * self.total_s
        seen = 0.0
        for index in range(len(self.bins) - 1, -1, -1):
            seen += self.bins[index]
            if seen > tail:
                return (index + 1) * self.params.bin_z, self.total_s
        return 0.0, self.total_s


def load_band(active: int) -> int:
    """0 for no session, then one band per power of two: 1, 2-3, 4-7, 8-15 ..."""
    return active.bit_length()


class BurstMemory:
    """Feed it the active count at every decision (``record``); ``rise_z(active)`` is the coefficient to staff
    with at that load."""

    def __init__(self, params: BurstParams | None = None) -> None:
        self.params = params or BurstParams()
        self._all = _Histogram(self.params)
        self._bands: dict[int, _Histogram] = {}
        self._open = _OpenRises(self.params.horizon_s, self.params.horizon_s / self.params.starts_per_horizon)
        self._from_empty: deque[tuple[float, int]] = deque()  # (closed at, peak) of rises from no session active
        self._empty_at_s: float | None = None  # when no session was last active
        self._now_s = -math.inf

    def record(self, now_s: float, active: int) -> None:
        """Count the rises whose horizon has passed, follow the others; forget the clumps from empty older than the
        window."""
        self._now_s = max(self._now_s, now_s)
        for rise in self._open.record(now_s, active):
            self._close(rise, now_s)
        while self._from_empty and self._now_s - self._from_empty[0][0] > self.params.window_s:
            self._from_empty.popleft()
        if active == 0:
            self._empty_at_s = now_s

    def learnt(self, now_s: float) -> dict[str, Any]:
        """What this memory has seen, as plain data with times as ages at ``now_s``, so a scheduler that restarts
        sizes from it instead of from the prior (``relearn``)."""
        return {
            "all": self._all.learnt(now_s),
            "bands": {str(band): histogram.learnt(now_s) for band, histogram in self._bands.items()},
            "open": self._open.learnt(now_s),
            "from_empty": [[now_s - closed_s, peak] for closed_s, peak in self._from_empty],
            "empty_age_s": None if self._empty_at_s is None else now_s - self._empty_at_s,
        }

    @classmethod
    def from_learnt(cls, params: BurstParams, state: Mapping[str, Any], at_s: float) -> BurstMemory:
        """A memory holding what ``learnt`` gave, as of ``at_s`` on this process's clock (the time between is
        forgotten as if nothing rose). A malformed state raises BurstMemoryError, KeyError, TypeError or
        ValueError."""
        memory = cls(params)
        memory._all.relearn(state["all"], at_s)
        for band, learnt in state["bands"].items():
            memory._bands[int(band)] = histogram = _Histogram(params)
            histogram.relearn(learnt, at_s)
        memory._open.relearn(state["open"], at_s)
        memory._from_empty = deque((at_s - float(age), int(peak)) for age, peak in state["from_empty"])
        memory._empty_at_s = None if state["empty_age_s"] is None else at_s - float(state["empty_age_s"])
        memory._now_s = at_s
        return memory

    def _close(self, rise: _Rise, now_s: float) -> None:
        z = (rise.peak_active - rise.start_active) / math.sqrt(max(rise.start_active, 1))
        self._all.add(now_s, z, rise.weight_s)
        band = self._bands.setdefault(load_band(rise.start_active), _Histogram(self.params))
        band.add(now_s, z, rise.weight_s)
        if rise.start_active == 0 and rise.peak_active > 0:
            while self._from_empty and self._from_empty[-1][1] <= rise.peak_active:
                self._from_empty.pop()  # kept decreasing in peak, so the first is the largest in the window
            self._from_empty.append((now_s, rise.peak_active))

    @property
    def overall_z(self) -> float:
        """The tail of the rises from every load, blended with ``prior_z``: the prior counts as ``prior_s``
        seconds of history."""
        params = self.params
        observed, weight_s = self._all.tail(self._now_s)
        return (params.prior_s * params.prior_z + weight_s * observed) / (params.prior_s + weight_s)

    def rise_z(self, active: int) -> float:
        """The tail of the rises that started in ``active``'s load band, blended with ``overall_z`` as the
        prior while the band has little history."""
        prior_z = self.overall_z
        band = self._bands.get(load_band(active))
        if band is None:
            return prior_z
        observed, weight_s = band.tail(self._now_s)
        return (self.params.prior_s * prior_z + weight_s * observed) / (self.params.prior_s + weight_s)

    def clump_room(self) -> int:
        """The sessions of the largest clump from empty in the window, while the pool is empty or was within the
        last horizon (a clump still arriving); 0 otherwise."""
        recent = self._empty_at_s is not None and self._now_s - self._empty_at_s <= self.params.horizon_s
        return self._from_empty[0][1] if recent and self._from_empty else 0


class RecentRises:
    """The rises of the active count over ``horizon_s`` that closed within the last ``window_s``, raw (in sessions,
    not normalised by the load), one started every ``step_s``: the plainest estimate of how far the load may rise
    now, for a sizing that reads a quantile of it (``autoscale.RecentRiseHeadroom``). Kept sorted, so a quantile
    is an index."""

    def __init__(self, horizon_s: float, window_s: float, step_s: float = 5.0) -> None:
        if horizon_s <= 0 or window_s <= 0 or step_s <= 0:
            raise BurstMemoryError(f"horizon_s, window_s and step_s must be positive, got {horizon_s}, {window_s}, "
                                   f"{step_s}")
        self.window_s = window_s
        self._open = _OpenRises(horizon_s, step_s)
        self._closed: deque[tuple[float, int]] = deque()  # (closed at, rise), in closing order
        self._sorted: list[int] = []

    def __len__(self) -> int:
        return len(self._sorted)

    def record(self, now_s: float, active: int) -> None:
        for rise in self._open.record(now_s, active):
            self._closed.append((now_s, rise.peak_active - rise.start_active))
            bisect.insort(self._sorted, rise.peak_active - rise.start_active)
        while self._closed and now_s - self._closed[0][0] > self.window_s:
            self._sorted.pop(bisect.bisect_left(self._sorted, self._closed.popleft()[1]))

    def quantile(self, q: float) -> int:
        """The ``q`` quantile of the rises in the window (a drawn rise, never between two); 0 with none."""
        if not self._sorted:
            return 0
        return self._sorted[min(max(math.ceil(q * len(self._sorted)) - 1, 0), len(self._sorted) - 1)]
