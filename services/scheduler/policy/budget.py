"""Violation budget: how much of the over-target allowance the cluster has actually spent, as a headroom share.

A session left waiting for a slot misses the target on every chunk it owes, so the share of active
session-time spent waiting is what the 0.1% budget is spent on. The controller keeps that share (forgotten
over ``window_s``) and, while it stays far under what the budget allows, lets the autoscaler keep less of its
burst headroom: headroom bought against surges this workload has not shown is slack worth spending. It never
raises the headroom above the burst memory's own figure: waits are seen only after the surge that caused
them, and on the synthetic set buying more after them cost GPUs for hardly fewer violations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class BudgetError(ValueError):
    """Bad budget configuration (a share outside (0, 1), non-positive windows, inverted scale bounds)."""


@dataclass(frozen=True, slots=True)
class BudgetParams:
    """``budget_frac``: the share of chunks allowed over target (issue 3: 0.1%); ``aim``: the part of it the
    rule steers to, leaving the rest for surges it has not yet seen; ``window_s``: how long a wait is
    remembered; ``prior_session_s``: session-seconds of on-aim history assumed at start, so the first minutes
    neither spend nor save; ``exponent``: how strongly the share follows the ratio of spent to aimed (small:
    gentle, since waits grow steeply as headroom shrinks); ``min_scale``/``max_scale``: clamps. Ours takes
    ``aim`` and ``min_scale`` from ``registry.CHOSEN`` (its ``budget_aim`` and ``headroom_floor``), chosen by
    ``bench/choose_settings.py`` on calm synthetic days beside the bursty ones. ``chunk_interval_s``: the play
    time of one chunk, what one late chunk counts as.
    """

    budget_frac: float = 0.001
    aim: float = 0.5
    window_s: float = 3600.0
    prior_session_s: float = 3600.0
    exponent: float = 0.25
    min_scale: float = 0.7
    max_scale: float = 1.0
    chunk_interval_s: float = 0.75

    def __post_init__(self) -> None:
        if not 0 < self.budget_frac < 1 or not 0 < self.aim <= 1:
            raise BudgetError(f"budget_frac and aim must be in (0, 1), got {self.budget_frac}, {self.aim}")
        if self.window_s <= 0 or self.prior_session_s <= 0 or self.exponent < 0:
            raise BudgetError(
                f"window_s, prior_session_s must be positive and exponent non-negative, got {self.window_s}, "
                f"{self.prior_session_s}, {self.exponent}"
            )
        if not 0 < self.min_scale <= self.max_scale:
            raise BudgetError(f"need 0 < min_scale <= max_scale, got {self.min_scale}, {self.max_scale}")


class ViolationBudget:
    """Decayed session-seconds active and waiting; ``record`` is given the counts that held since the last call,
    and the chunks the decision itself makes late (a resume landing where its restore pushes the batch it streams in
    under past the target), each counted as one chunk interval of waiting."""

    def __init__(self, params: BudgetParams | None = None) -> None:
        self.params = params or BudgetParams()
        aimed = self.params.budget_frac * self.params.aim
        self._active_s = self.params.prior_session_s
        self._waiting_s = self.params.prior_session_s * aimed
        self._last_s: float | None = None
        self._active = 0
        self._waiting = 0

    def record(self, now_s: float, active: int, waiting: int, late_chunks: int = 0) -> None:
        """Account the interval since the previous call at the counts given then; keep these for the next."""
        if self._last_s is not None and now_s > self._last_s:
            span_s = now_s - self._last_s
            keep = math.exp(-span_s / self.params.window_s)
            self._active_s = keep * self._active_s + self._active * span_s
            self._waiting_s = keep * self._waiting_s + min(self._waiting, self._active) * span_s
        self._waiting_s += late_chunks * self.params.chunk_interval_s
        if self._last_s is None or now_s >= self._last_s:
            self._last_s = now_s
        self._active, self._waiting = active, waiting

    def learnt(self, now_s: float) -> dict[str, Any]:
        """The decayed session-seconds and the counts that hold now, as plain data (``from_learnt``)."""
        return {"active_s": self._active_s, "waiting_s": self._waiting_s, "active": self._active,
                "waiting": self._waiting, "last_age_s": None if self._last_s is None else now_s - self._last_s}

    @classmethod
    def from_learnt(cls, params: BudgetParams, state: Mapping[str, Any], at_s: float) -> ViolationBudget:
        """A budget holding what ``learnt`` gave, as of ``at_s`` on this process's clock. The time between is
        accounted at the counts that held when it was saved, as the next ``record`` would; a malformed state raises
        BudgetError, KeyError, TypeError or ValueError."""
        budget = cls(params)
        active_s, waiting_s = float(state["active_s"]), float(state["waiting_s"])
        if waiting_s < 0 or active_s <= 0:
            raise BudgetError(f"a budget that waited {waiting_s} of {active_s} session-seconds")
        budget._active_s, budget._waiting_s = active_s, waiting_s
        budget._active, budget._waiting = int(state["active"]), int(state["waiting"])
        budget._last_s = None if state["last_age_s"] is None else at_s - float(state["last_age_s"])
        return budget

    @property
    def spent_frac(self) -> float:
        """Share of recent active session-time spent waiting: the chunks over target it has cost."""
        return self._waiting_s / self._active_s

    def headroom_scale(self) -> float:
        """(spent / aimed) ** exponent, clamped: 1 when the budget is spent exactly as aimed."""
        params = self.params
        ratio = self.spent_frac / (params.budget_frac * params.aim)
        scale = ratio**params.exponent if ratio > 0 else 0.0
        return min(max(scale, params.min_scale), params.max_scale)
