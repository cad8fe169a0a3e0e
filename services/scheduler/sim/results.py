"""What one simulated run measured: the headline figures, the counters, and a per-sample time series."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(slots=True)
class TimeSeries:
    """One row per sample interval: active sessions and GPUs at its end, worst chunk latency and the share of
    chunks over target within it."""

    time_s: list[float] = field(default_factory=list)
    active: list[int] = field(default_factory=list)
    gpus: list[int] = field(default_factory=list)
    worst_ms: list[float] = field(default_factory=list)
    over_target_frac: list[float] = field(default_factory=list)

    def append(self, time_s: float, active: int, gpus: int, worst_ms: float, over_target_frac: float) -> None:
        self.time_s.append(time_s)
        self.active.append(active)
        self.gpus.append(gpus)
        self.worst_ms.append(worst_ms)
        self.over_target_frac.append(over_target_frac)


@dataclass(slots=True)
class SimResult:
    """Headline figures of one replay; ``counters`` holds migrations, migrated_bytes, offloads, restores,
    placements, scale events, decisions and opens that never got a chunk. ``over_interval_frac``: chunks later
    than a chunk's own play time, which a player stalls on; over target but within it is late for the target
    yet still real time. ``first_chunk_s``: sorted times from an open to its first chunk. ``late_chunks_by_cause``:
    the chunks over target, put down to the engine's ``LATE_CAUSES``; ``gpu_hours_by_use``: the GPU-hours, put down
    to its ``GPU_USES``."""

    policy: str
    trace: str
    gpu_hours: float
    worst_latency_ms: float
    p99_latency_ms: float
    over_target_frac: float
    over_interval_frac: float
    total_chunks: float
    counters: dict[str, int]
    decide_median_ms: float
    decide_p99_ms: float
    series: TimeSeries
    first_chunk_s: list[float] = field(default_factory=list)
    late_chunks_by_cause: dict[str, float] = field(default_factory=dict)
    gpu_hours_by_use: dict[str, float] = field(default_factory=dict)

    def first_chunk_quantile_s(self, q: float) -> float:
        """Time from open to first chunk below which a share ``q`` of the window's opens fall (0 with none)."""
        if not self.first_chunk_s:
            return 0.0
        return self.first_chunk_s[min(len(self.first_chunk_s) - 1, max(0, math.ceil(q * len(self.first_chunk_s)) - 1))]

    def over_target_by_cause(self) -> dict[str, float]:
        """Each cause's share of all chunks: together, ``over_target_frac``."""
        return {cause: late / self.total_chunks if self.total_chunks > 0 else 0.0
                for cause, late in self.late_chunks_by_cause.items()}

    def over_target_columns(self) -> dict[str, float]:
        """``over_target_by_cause`` as the flat ``over_target_frac_<cause>`` columns of a JSON row."""
        return {f"over_target_frac_{cause}": share for cause, share in self.over_target_by_cause().items()}

    def gpu_hours_columns(self) -> dict[str, float]:
        """``gpu_hours_by_use`` as the flat ``gpu_hours_<use>`` columns of a JSON row."""
        return {f"gpu_hours_{use}": round(hours, 3) for use, hours in self.gpu_hours_by_use.items()}

    def summary(self) -> dict[str, float | int | str]:
        return {
            "policy": self.policy,
            "trace": self.trace,
            "gpu_hours": round(self.gpu_hours, 3),
            "worst_latency_ms": round(self.worst_latency_ms, 1),
            "p99_latency_ms": round(self.p99_latency_ms, 1),
            "over_target_frac": self.over_target_frac,
            "over_interval_frac": self.over_interval_frac,
            "total_chunks": round(self.total_chunks),
            "decide_median_ms": round(self.decide_median_ms, 4),
            "decide_p99_ms": round(self.decide_p99_ms, 4),
            "first_chunk_p50_s": round(self.first_chunk_quantile_s(0.5), 3),
            "first_chunk_p99_s": round(self.first_chunk_quantile_s(0.99), 3),
            "first_chunk_max_s": round(self.first_chunk_quantile_s(1.0), 3),
            **self.over_target_columns(),
            **self.gpu_hours_columns(),
            **self.counters,
        }
