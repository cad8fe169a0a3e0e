"""How many streams this worker holds in real time, from what its batches cost: the K the scheduler places by.

Every paced stream needs one chunk per chunk interval, and a chunk is credited about one interval before its
first frame plays, so K sessions are held while a batch of K, with the hold's safety factor and margin, fits in
one interval. A batch size never measured is priced along the line through the two largest sizes measured (in
proportion to the only one, at first), from the typical costs that one slow batch does not swing: K starts low
on a new worker and rises as its batches grow, and falls when big batches turn out slower than the line said.
It never exceeds the configured ceiling, which is also K before any batch or any paced stream was seen.
Pure: no I/O.
"""

from __future__ import annotations

from services.gpu_worker.batch_hold import MARGIN_MS, SAFETY, BatchCost


def realtime_capacity(cost: BatchCost, interval_ms: float | None, ceiling: int) -> int:
    """The most sessions (1..``ceiling``) whose batch fits in ``interval_ms``; ``ceiling`` before any
    measurement or any paced stream."""
    if not interval_ms or cost.largest_measured == 0:
        return ceiling
    held = 1
    for size in range(1, ceiling + 1):
        predicted = cost.predict_ms(size, typical=True)
        if predicted is not None and SAFETY * predicted + MARGIN_MS <= interval_ms:
            held = size
    return held
