"""What a worker learns from its batches' cost, and what it does with it: when a batch that is not full waits
for the paced streams about to join it (batch_hold), and the K it reports (capacity)."""

from __future__ import annotations

import pytest

from services.gpu_worker.batch_hold import MARGIN_MS, SAFETY, BatchCost, hold_until_ms
from services.gpu_worker.capacity import realtime_capacity

INTERVAL_MS = 750.0  # a 12-frame chunk at 16 fps


def cost_of(**sizes_ms: float) -> BatchCost:
    cost = BatchCost()
    for size, ms in sizes_ms.items():
        cost.observe(int(size.removeprefix("n")), ms)
    return cost


def test_the_cost_of_a_batch_is_learnt_and_never_guessed_lower_for_more_sessions() -> None:
    cost = cost_of(n2=100.0, n8=160.0)
    assert cost.predict_ms(2) == 100.0
    assert cost.predict_ms(4) == 160.0, "the nearest larger batch measured"
    assert cost.predict_ms(16) == pytest.approx(320.0), "beyond what was measured: in proportion"
    cost.observe(2, 50.0)
    assert cost.predict_ms(2) == pytest.approx(85.0), "a faster batch lowers it gradually"
    cost.observe(2, 200.0)
    assert cost.predict_ms(2) == 200.0, "a slower one at once"
    assert BatchCost().predict_ms(3) is None


def test_a_batch_waits_for_a_stream_due_to_join_while_its_deadline_leaves_room() -> None:
    cost = cost_of(n2=100.0)
    until = hold_until_ms([10_000.0], joining_at_ms=[9_500.0], cost=cost, max_batch=8)
    assert until == pytest.approx(10_000.0 - SAFETY * 100.0 - MARGIN_MS)


@pytest.mark.parametrize(("deadlines", "joining", "why"), [
    ([10_000.0], [9_900.0], "the joiner comes too late to share the pass"),
    ([10_000.0], [], "nobody is due to join"),
    ([None, 10_000.0], [9_000.0], "a stream without a deadline wants its chunk now"),
    ([10_000.0, 10_500.0], [9_000.0], "the batch is full"),
])
def test_a_batch_runs_at_once(deadlines: list[float | None], joining: list[float], why: str) -> None:
    assert hold_until_ms(deadlines, joining, cost_of(n2=100.0, n3=100.0), max_batch=2) is None, why


def test_a_worker_that_never_ran_a_batch_does_not_guess_and_runs_at_once() -> None:
    assert hold_until_ms([10_000.0], [9_000.0], BatchCost(), max_batch=8) is None


def test_before_any_batch_or_any_paced_stream_the_ceiling_is_k() -> None:
    assert realtime_capacity(BatchCost(), INTERVAL_MS, ceiling=8) == 8
    assert realtime_capacity(cost_of(n4=100.0), None, ceiling=8) == 8


def test_k_is_the_largest_batch_that_fits_in_one_interval_and_grows_as_bigger_batches_are_cost_of() -> None:
    budget_ms = (INTERVAL_MS - MARGIN_MS) / SAFETY  # 325 ms
    assert realtime_capacity(cost_of(n1=100.0), INTERVAL_MS, ceiling=16) == int(budget_ms // 100.0) == 3, \
        "priced in proportion beyond what was measured"
    cost = cost_of(n1=100.0, n3=140.0, n8=240.0)
    assert realtime_capacity(cost, INTERVAL_MS, ceiling=16) == 12, \
        "8 measured at 240 ms, 20 ms more a session since 3: 12 priced at 320 ms"
    flat = cost_of(n4=200.0, n8=200.0)
    assert realtime_capacity(flat, INTERVAL_MS, ceiling=64) == 28, "a flat line still rises a quarter step (6.25 ms)"
    assert realtime_capacity(cost, INTERVAL_MS, ceiling=6) == 6, "never past the ceiling"


def test_a_worker_too_slow_for_even_one_stream_still_reports_one() -> None:
    assert realtime_capacity(cost_of(n1=900.0), INTERVAL_MS, ceiling=4) == 1


def test_one_slow_batch_does_not_swing_k() -> None:
    cost = cost_of(n4=200.0)
    for _ in range(20):
        cost.observe(4, 200.0)
    cost.observe(4, 800.0)  # a hiccup: the cautious cost the hold uses jumps, the typical one does not
    assert cost.predict_ms(4) == 800.0
    assert realtime_capacity(cost, INTERVAL_MS, ceiling=4) == 4
