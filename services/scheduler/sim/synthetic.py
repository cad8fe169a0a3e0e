"""Synthetic session traces with controlled burstiness and duration heterogeneity, for tuning and tests (the
shared real traces are kept for evaluation only, so nothing is tuned on them in hindsight)."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from services.scheduler.sim.trace import SessionTrace, Trace, TraceError


@dataclass(frozen=True, slots=True)
class SyntheticSpec:
    """Arrivals are Poisson with a daily sinusoid (``daily_swing`` 0..1) times a two-state burst process
    (bursts ``burst_factor`` times the base rate, lasting ``burst_s``, one every ``burst_every_s`` on average).
    Active periods are lognormal (median ``active_median_s``, log-sigma ``active_sigma``: duration
    heterogeneity), idle gaps exponential, ``mean_periods`` periods per session on average (geometric).
    Sessions start arriving ``warmup_s`` before the measured window, so it opens on a loaded cluster."""

    duration_s: float = 6 * 3600.0
    mean_active: float = 64.0
    daily_swing: float = 0.5
    burst_factor: float = 3.0
    burst_s: float = 300.0
    burst_every_s: float = 3600.0
    active_median_s: float = 45.0
    active_sigma: float = 1.0
    idle_mean_s: float = 120.0
    mean_periods: float = 3.0
    linger_s: float = 120.0
    state_bytes: int = 4_000_000_000
    warmup_s: float = 1800.0
    seed: int = 0


def _rate_shape(spec: SyntheticSpec, time_s: float, bursts: list[tuple[float, float]]) -> float:
    daily = 1.0 + spec.daily_swing * math.sin(2 * math.pi * time_s / 86400.0)
    burst = spec.burst_factor if any(a <= time_s < b for a, b in bursts) else 1.0
    return daily * burst


def generate(spec: SyntheticSpec) -> Trace:
    if spec.mean_active <= 0 or spec.duration_s <= 0 or spec.mean_periods < 1:
        raise TraceError(f"bad synthetic spec: {spec}")
    rng = random.Random(spec.seed)
    bursts: list[tuple[float, float]] = []
    time_s = rng.expovariate(1.0 / spec.burst_every_s)
    while time_s < spec.duration_s:
        bursts.append((time_s, time_s + spec.burst_s))
        time_s += spec.burst_s + rng.expovariate(1.0 / spec.burst_every_s)
    mean_active_s = spec.active_median_s * math.exp(spec.active_sigma**2 / 2) * spec.mean_periods
    burst_share = min(1.0, spec.burst_s * len(bursts) / spec.duration_s)
    mean_shape = 1.0 + (spec.burst_factor - 1.0) * burst_share
    base_rate = spec.mean_active / mean_active_s / mean_shape
    peak_rate = base_rate * (1.0 + spec.daily_swing) * spec.burst_factor
    sessions: list[SessionTrace] = []
    time_s = -spec.warmup_s
    while True:
        time_s += rng.expovariate(peak_rate)
        if time_s >= spec.duration_s:
            break
        if rng.random() * peak_rate > base_rate * _rate_shape(spec, time_s, bursts):
            continue
        periods: list[tuple[float, float]] = []
        start_s = time_s
        while True:
            end_s = start_s + max(spec.active_median_s * math.exp(rng.gauss(0.0, spec.active_sigma)), 0.75)
            periods.append((start_s, end_s))
            if rng.random() < 1.0 / spec.mean_periods:
                break
            start_s = end_s + rng.expovariate(1.0 / spec.idle_mean_s)
        sessions.append(SessionTrace(f"syn{len(sessions)}", tuple(periods), periods[-1][1] + spec.linger_s,
                                     spec.state_bytes))
    assumptions: dict[str, float | str] = {"source": "synthetic", **asdict(spec)}
    return Trace("synthetic", tuple(sessions), 0.0, spec.duration_s, assumptions)
