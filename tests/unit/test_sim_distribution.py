"""The weighted latency distribution answers tails and quantiles exactly from points and ranges."""

from __future__ import annotations

import pytest

from services.scheduler.sim.distribution import LatencyDistribution


def test_fraction_above_counts_points_and_the_matching_share_of_ranges() -> None:
    distribution = LatencyDistribution()
    distribution.add_point(300.0, 90.0)
    distribution.add_range(0.0, 1000.0, 10.0)
    assert distribution.total_chunks == pytest.approx(100.0)
    assert distribution.fraction_above(400.0) == pytest.approx(6.0 / 100.0)
    assert distribution.worst_ms == 1000.0


def test_quantile_falls_inside_the_range_that_holds_the_tail() -> None:
    distribution = LatencyDistribution()
    distribution.add_point(100.0, 98.0)
    distribution.add_range(1000.0, 2000.0, 2.0)
    assert distribution.quantile_ms(0.99) == pytest.approx(1500.0, rel=1e-3)
    assert distribution.quantile_ms(0.5) == pytest.approx(100.0, abs=0.5)


def test_a_negative_correction_moves_one_chunk_to_a_slower_latency() -> None:
    distribution = LatencyDistribution()
    distribution.add_point(363.0, 10.0)
    distribution.add_point(363.0, -1.0)
    distribution.add_point(427.0, 1.0)
    assert distribution.fraction_above(400.0) == pytest.approx(0.1)
