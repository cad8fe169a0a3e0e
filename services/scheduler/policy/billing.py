"""How a cloud bills a GPU, and so when giving one back saves anything.

Clouds bill a GPU from the moment it is asked for, but not all by the second: AWS and GCP charge a minute at
least and then by the second, others by the hour. A GPU released before its paid time runs out saves nothing,
so while it is paid for it is free headroom, and the moment to release a surplus GPU is just before its next
increment begins. The simulator charges by this model and ours releases by it (``ControllerConfig.billing``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class BillingError(ValueError):
    """A billing model no cloud has: a negative minimum or increment."""


@dataclass(frozen=True, slots=True)
class Billing:
    """``minimum_s``: the least a GPU is charged; ``increment_s``: the unit charged beyond it (0: to the instant).
    The default, nothing rounded, is what the issue's lower bound assumes; AWS and GCP are (60, 0) (per second
    after the first minute, as near as makes no difference), an hourly cloud (3600, 3600)."""

    minimum_s: float = 0.0
    increment_s: float = 0.0

    def __post_init__(self) -> None:
        if not (self.minimum_s >= 0 and self.increment_s >= 0):
            raise BillingError(f"need minimum_s >= 0 and increment_s >= 0, got {self.minimum_s}, {self.increment_s}")

    def charged_s(self, held_s: float) -> float:
        """What a GPU held ``held_s`` (asked for to released) is charged."""
        rounded = held_s if self.increment_s == 0 else math.ceil(held_s / self.increment_s - 1e-9) * self.increment_s
        return max(self.minimum_s, rounded)

    def paid_until_s(self, billed_since_s: float, now_s: float) -> float:
        """When the time already charged for a GPU billed since ``billed_since_s`` runs out: never before ``now_s``,
        and exactly then when nothing is rounded."""
        return billed_since_s + self.charged_s(max(0.0, now_s - billed_since_s))
