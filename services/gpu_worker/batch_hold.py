"""Whether a batch that is not full runs now or waits a little for the streams about to join it.

Paced streams get credit one at a time, each when its client starts playing a chunk, so the ready sessions of a
busy worker trickle in and a worker that always runs what is ready runs many small batches: the forward pass costs
nearly as much for 2 sessions as for 20, and the worker saturates long before its batch does. Every ready chunk
has a deadline (when its first frame plays), and most have slack. So a batch waits while its earliest deadline
still leaves room for the batch it would become, and only while another stream's credit is expected before
then: a lone stream, or a worker whose other streams are not due soon, runs at once. Pure: no clock, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

SAFETY = 2.0
"""The forward pass a held batch reserves, as a multiple of what a batch of its size took lately."""
MARGIN_MS = 100.0
"""Time kept beyond that for handing the chunk to the gateway and the client."""
SMOOTHING = 0.3
TYPICAL_SMOOTHING = 0.1


class BatchCost:
    """What a batch of ``n`` sessions costs on this worker (forward and encoding, ms), learnt from the batches
    it ran, two ways. Cautious: a slower batch raises it at once, faster ones lower it gradually, since a hold
    planned on a cost too low makes chunks late. Typical: a slow average, for the capacity the scheduler places
    by, which one slow batch must not swing."""

    def __init__(self) -> None:
        self._ms: dict[int, float] = {}
        self._typical_ms: dict[int, float] = {}

    def observe(self, size: int, ms: float) -> None:
        known = self._ms.get(size)
        self._ms[size] = ms if known is None or ms > known else (1 - SMOOTHING) * known + SMOOTHING * ms
        typical = self._typical_ms.get(size)
        self._typical_ms[size] = ms if typical is None else (1 - TYPICAL_SMOOTHING) * typical + TYPICAL_SMOOTHING * ms

    @property
    def largest_measured(self) -> int:
        return max(self._ms, default=0)

    def predict_ms(self, size: int, *, typical: bool = False) -> float | None:
        """The cost of ``size``: as measured; else the nearest larger size measured (a batch costs no less for
        more sessions); None before any batch ran. Past the largest size measured: cautious, in proportion to
        it; typical, along the line through the two largest sizes measured, rising by at least a quarter of the
        proportional step (in proportion while only one size is known)."""
        table = self._typical_ms if typical else self._ms
        if size in table:
            return table[size]
        larger = [n for n in table if n > size]
        if larger:
            return table[min(larger)]
        if not table:
            return None
        sizes = sorted(table)
        top = sizes[-1]
        proportional_step = table[top] / top
        if not typical or len(sizes) == 1:
            return table[top] + proportional_step * (size - top)
        below = sizes[-2]
        step = max((table[top] - table[below]) / (top - below), proportional_step / 4)
        return table[top] + step * (size - top)


def hold_until_ms(
    deadlines_ms: Sequence[float | None], joining_at_ms: Sequence[float], cost: BatchCost, max_batch: int
) -> float | None:
    """When to run a batch of sessions due at ``deadlines_ms`` (None: no deadline, run now) that other streams
    are expected to join at ``joining_at_ms``; None: run now.

    The batch waits for as many joiners as arrive before the time its grown size still leaves; it grows to at
    most twice the largest batch measured, so a cost it has never seen is only ever guessed one doubling ahead
    (and in proportion, which a batched forward pass does not exceed)."""
    if not deadlines_ms or len(deadlines_ms) >= max_batch or any(d is None for d in deadlines_ms):
        return None
    earliest = min(d for d in deadlines_ms if d is not None)
    largest = min(max_batch, 2 * cost.largest_measured)
    hold_end = None
    for joined, at in enumerate(sorted(joining_at_ms), start=1):
        size = len(deadlines_ms) + joined
        predicted = cost.predict_ms(size)
        if size > largest or predicted is None:
            break
        end = earliest - SAFETY * predicted - MARGIN_MS
        if at < end:
            hold_end = end
    return hold_end
