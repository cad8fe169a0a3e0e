"""Autoscale family: how many GPUs the pool should have, from the post-placement load.

Each policy answers ``target_gpus(reading, active, capacity) -> (count, reason)``; the controller turns the
difference with the current pool into AddGpus, or (down to the largest target of the last hold time, once
fewer GPUs have sufficed that long) into drains and removals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from services.scheduler.policy.bursts import BurstMemory, BurstParams, RecentRises
from services.scheduler.policy.detector import WorkloadReading


class AutoscaleError(ValueError):
    """Bad autoscaler bounds (min above max, a non-positive utilisation)."""


class AutoscalePolicy(Protocol):
    name: str
    min_gpus: int
    max_gpus: int
    hold_s: float | None

    def target_gpus(self, reading: WorkloadReading, capacity: int) -> tuple[int, str]: ...


@runtime_checkable
class Learning(Protocol):
    """A sizing that learns from the load it sees, and can hand that on to the scheduler that follows it."""

    def learnt(self, now_s: float) -> dict[str, Any]: ...

    def relearn(self, state: Mapping[str, Any], at_s: float) -> None: ...


def check_bounds(min_gpus: int, max_gpus: int) -> None:
    if min_gpus < 0 or max_gpus < max(min_gpus, 1):
        raise AutoscaleError(f"need 0 <= min_gpus <= max_gpus and max_gpus >= 1, got {min_gpus}, {max_gpus}")


def headroom_pool(slots: float, active: int, capacity: int, spare_gpus: int, min_gpus: int, max_gpus: int) -> int:
    """The GPUs a headroom sizing asks for: room for ``slots`` sessions, at least the GPUs the active sessions fill
    and ``spare_gpus`` warm beyond them, within the bounds (one rule for ours and every sizing measured against
    it, so they differ only in their slots)."""
    spare = math.ceil(active / capacity) + spare_gpus
    return min(max(math.ceil(slots / capacity - 1e-9), spare, min_gpus), max_gpus)


class FixedAllocation:
    """A constant pool (sized offline for the peak, the mean, or a given cost): never scales."""

    hold_s: float | None = None

    def __init__(self, gpus: int) -> None:
        check_bounds(gpus, gpus)
        self.name = f"fixed_{gpus}"
        self.min_gpus = self.max_gpus = gpus

    def target_gpus(self, reading: WorkloadReading, capacity: int) -> tuple[int, str]:
        return self.min_gpus, f"fixed allocation of {self.min_gpus} GPUs"


class ReactiveUtilisation:
    """The paper's rule: ceil(N / (K rho)), never below ceil(N / K), clamped; a fixed hold before scale-in.

    ``rho`` None takes the detector level's rho (the paper's per-level parameters).
    """

    def __init__(self, rho: float | None, min_gpus: int, max_gpus: int, hold_s: float = 5.0) -> None:
        check_bounds(min_gpus, max_gpus)
        if rho is not None and not 0 < rho <= 1:
            raise AutoscaleError(f"rho must be in (0, 1], got {rho}")
        self.name = "reactive" if rho is None else f"reactive_rho{rho:g}"
        self.rho = rho
        self.min_gpus, self.max_gpus = min_gpus, max_gpus
        self.hold_s: float | None = hold_s

    def target_gpus(self, reading: WorkloadReading, capacity: int) -> tuple[int, str]:
        rho = reading.level.rho if self.rho is None else self.rho
        count = max(math.ceil(reading.active / (capacity * rho)), math.ceil(reading.active / capacity))
        count = min(max(count, self.min_gpus), self.max_gpus)
        return count, f"{reading.active} active at rho {rho:g} -> {count} GPUs"


class AnticipatoryHeadroom:
    """Ours: spare slots for the rise of the active count that can come before a GPU asked for now is ready.

    The offered load a is the active count now plus its drift over the horizon h (provisioning delay plus one
    decision interval); the pool covers a + beta sqrt(max(a, 1)) sessions (a rise from an empty pool is
    measured against one session). Around a lull (no session active now or within the horizon) the pool also
    holds room for the whole of the largest clump seen from empty (``bursts`` says why). Poisson rises over h grow
    like sqrt(a), but how far beyond that a workload's arrivals clump is its own, so beta is
    not a constant: it is ``burst_coverage`` times the 99th percentile of the rises seen so far from loads like
    this one (``bursts.BurstMemory``, in units of sqrt(load)), times the share the violation budget keeps
    (below 1 only while waits have spent far less than the budget allows). At low load that can be less than a
    GPU, so the pool also keeps ``spare_gpus`` beyond those its active sessions fill: a clump at night then lands
    on a warm GPU (with its overflow slots) instead of waiting out the provisioning delay. The pool follows the
    active count up at once; it comes down once fewer GPUs have sufficed for the level's whole hold (``hold_s``
    None), and then to the largest target of that hold, step by step as the window slides (as Kubernetes'
    scale-down stabilization window), never below the sessions active now.

    ``burst_coverage`` is chosen on the synthetic generators only (``bench/choose_settings.py``, carried by
    ``registry.CHOSEN``), never on the shared traces.
    """

    def __init__(
        self, provisioning_delay_s: float, decision_interval_s: float, min_gpus: int, max_gpus: int,
        burst_coverage: float = 0.5, spare_gpus: int = 1,
    ) -> None:
        check_bounds(min_gpus, max_gpus)
        if provisioning_delay_s < 0 or decision_interval_s <= 0 or burst_coverage < 0 or spare_gpus < 0:
            raise AutoscaleError(
                f"bad horizon, coverage or spare: provisioning_delay_s={provisioning_delay_s}, "
                f"decision_interval_s={decision_interval_s}, burst_coverage={burst_coverage}, spare_gpus={spare_gpus}"
            )
        self.name = "anticipatory"
        self.horizon_s = provisioning_delay_s + decision_interval_s
        self.min_gpus, self.max_gpus = min_gpus, max_gpus
        self.hold_s: float | None = None
        self.burst_coverage = burst_coverage
        self.spare_gpus = spare_gpus
        self.bursts = BurstMemory(BurstParams(horizon_s=self.horizon_s))

    def learnt(self, now_s: float) -> dict[str, Any]:
        return self.bursts.learnt(now_s)

    def relearn(self, state: Mapping[str, Any], at_s: float) -> None:
        self.bursts = BurstMemory.from_learnt(self.bursts.params, state, at_s)

    def target_gpus(self, reading: WorkloadReading, capacity: int) -> tuple[int, str]:
        self.bursts.record(reading.now_s, reading.active)
        drift = max(0.0, reading.inflow_per_s - reading.outflow_per_s) * self.horizon_s
        offered = reading.active + drift
        rise_z = self.bursts.rise_z(reading.active)
        beta = self.burst_coverage * rise_z * reading.headroom_scale
        clump = self.bursts.clump_room()
        slots = max(offered + beta * math.sqrt(max(offered, 1.0)), float(reading.active), float(clump))
        count = headroom_pool(slots, reading.active, capacity, self.spare_gpus, self.min_gpus, self.max_gpus)
        return count, (
            f"{reading.active} active, offered {offered:.1f} (+{drift:.1f} drift over {self.horizon_s:.0f} s), "
            f"beta {beta:.2f} (coverage {self.burst_coverage:g} x rise {rise_z:.2f} sqrt(a) x budget "
            f"{reading.headroom_scale:.2f})" + (f", room for a clump of {clump} after a lull" if clump else "")
            + f" -> {count} GPUs"
        )


class RecentRiseHeadroom:
    """A candidate for ours' sizing, not adopted: room for the active sessions plus the ``quantile`` of the
    rises of the active count over the horizon (provisioning delay plus one decision interval) seen in the last
    ``window_s``, in sessions as they came (``bursts.RecentRises``); ``spare_gpus`` and the scale-in hold as ours.

    Why: told the distribution of the rise at each moment (``sim.forecast``), sizing to a quantile of it meets
    both targets in every shared-trace cell but Mooncake 16, while ours' learnt, load-normalised headroom pays
    0.035 to 0.12 of a lower bound more at the same share over target. The last half hour of rises is the
    plainest causal stand-in for that distribution; its frontier lies between the two (``bench/forecast_bound.py``).
    Until ``window_s`` holds ``PRIOR_RISES`` rises it covers ``prior_z`` standard deviations of a Poisson rise, as
    ours' burst memory does before it has seen any. It does not remember a clump from an empty pool, as ours does.
    """

    PRIOR_RISES = 20

    def __init__(
        self, provisioning_delay_s: float, decision_interval_s: float, min_gpus: int, max_gpus: int,
        quantile: float, window_s: float, spare_gpus: int = 1, prior_z: float = 3.0,
    ) -> None:
        check_bounds(min_gpus, max_gpus)
        if not 0 < quantile < 1 or spare_gpus < 0 or prior_z < 0:
            raise AutoscaleError(f"need 0 < quantile < 1, spare_gpus >= 0, prior_z >= 0, got {quantile}, "
                                 f"{spare_gpus}, {prior_z}")
        self.name = f"recent_rises_q{quantile:g}"
        self.min_gpus, self.max_gpus = min_gpus, max_gpus
        self.hold_s: float | None = None
        self.quantile, self.spare_gpus, self.prior_z = quantile, spare_gpus, prior_z
        self.rises = RecentRises(provisioning_delay_s + decision_interval_s, window_s)

    def target_gpus(self, reading: WorkloadReading, capacity: int) -> tuple[int, str]:
        self.rises.record(reading.now_s, reading.active)
        if len(self.rises) >= self.PRIOR_RISES:
            rise, source = float(self.rises.quantile(self.quantile)), f"q{self.quantile:g} of {len(self.rises)} rises"
        else:
            rise, source = self.prior_z * math.sqrt(max(reading.active, 1)), "prior"
        count = headroom_pool(reading.active + rise, reading.active, capacity, self.spare_gpus, self.min_gpus,
                              self.max_gpus)
        return count, f"{reading.active} active, rise {rise:.1f} ({source}) -> {count} GPUs"
