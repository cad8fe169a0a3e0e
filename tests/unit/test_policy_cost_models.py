"""The fitted latency and transfer models start at the reference defaults and follow measured samples."""

from __future__ import annotations

import pytest

from services.scheduler.policy.cost_models import (
    CostModelError,
    LatencyCurve,
    LatencyModel,
    RestoreCostModel,
    TransferCostModel,
)


def test_reference_curve_gives_363_ms_for_a_full_gpu_and_180_ms_for_one_session() -> None:
    curve = LatencyCurve()
    assert curve.chunk_latency_ms(1) == pytest.approx(180.0 + 18.0 / 16)
    assert curve.chunk_latency_ms(4) == pytest.approx(180.0 + 3 * 55.0 + 18.0)
    assert curve.chunk_latency_ms(0) == 0.0


def test_past_capacity_a_gpu_runs_a_second_forward_and_only_its_sessions_come_late() -> None:
    curve = LatencyCurve()
    full_ms, one_ms, three_ms = curve.chunk_latency_ms(4), curve.chunk_latency_ms(1), curve.chunk_latency_ms(3)
    assert curve.batches(4) == ((full_ms, 4),)
    assert [size for _, size in curve.batches(9)] == [4, 4, 1]
    assert [ms for ms, _ in curve.batches(7)] == pytest.approx([full_ms, full_ms + three_ms])
    assert [ms for ms, _ in curve.batches(9)] == pytest.approx([full_ms, 2 * full_ms, 2 * full_ms + one_ms])
    assert curve.chunk_latency_ms(5) == pytest.approx(full_ms + one_ms)
    assert curve.late_chunks(7, 0.0, 400.0) == 3
    assert curve.late_chunks(7, 40.0, 400.0) == 7  # a 40 ms hold-up pushes the first forward past 400 ms too
    assert curve.late_chunks(0, 1000.0, 400.0) == 0


def test_latency_model_converges_to_a_slower_gpu_from_measured_samples() -> None:
    model = LatencyModel({"slow": LatencyCurve()})
    truth = LatencyCurve(base_ms=250.0, per_session_ms=70.0, quadratic_ms=10.0)
    for _ in range(200):
        for sessions in range(1, 5):
            model.observe("slow", sessions, truth.chunk_latency_ms(sessions))
    for sessions in range(1, 5):
        fitted_ms = model.curve("slow").chunk_latency_ms(sessions)
        assert fitted_ms == pytest.approx(truth.chunk_latency_ms(sessions), rel=0.02)


def test_a_few_samples_only_nudge_the_prior() -> None:
    model = LatencyModel({"h100": LatencyCurve()})
    model.observe("h100", 2, 1000.0)
    assert model.curve("h100").chunk_latency_ms(2) < 400.0


def test_latency_model_rejects_unknown_kinds_and_nonsense_samples() -> None:
    model = LatencyModel({"h100": LatencyCurve()})
    with pytest.raises(CostModelError):
        model.observe("b300", 1, 100.0)
    with pytest.raises(CostModelError):
        model.observe("h100", 0, 100.0)
    with pytest.raises(CostModelError):
        model.observe("h100", 1, -5.0)


def test_transfer_model_fits_fixed_and_per_byte_costs() -> None:
    model = TransferCostModel(alpha_ms=15.0, gigabytes_per_s=400.0)
    for size in (1e9, 2e9, 4e9, 8e9) * 20:
        model.observe(int(size), 40.0 + size / 100e6)
    assert model.cost_ms(3_000_000_000) == pytest.approx(40.0 + 30.0, rel=0.05)


def test_transfer_model_rejects_negative_samples() -> None:
    with pytest.raises(CostModelError):
        TransferCostModel(alpha_ms=15.0, gigabytes_per_s=400.0).observe(-1, 10.0)


def test_a_restore_streamed_per_layer_delays_its_first_chunk_by_what_the_first_pass_cannot_hide() -> None:
    copy = TransferCostModel(alpha_ms=0.0, gigabytes_per_s=55.0)  # 4 GB: 72.7 ms
    streamed = RestoreCostModel(copy, layers=30, first_pass_share=0.15)
    assert streamed.cost_ms(4_000_000_000) == pytest.approx(72.7, abs=0.1)
    # beside 3 sessions (363 ms) the first pass, 54 ms, hides all but 20 ms of the copy
    assert streamed.delay_ms(4_000_000_000, 363.0) == pytest.approx(72.7 - 0.15 * 363.0 * 29 / 30, abs=0.1)
    # a pass slower than the link leaves only the first layer's copy exposed
    assert streamed.delay_ms(4_000_000_000, 3000.0) == pytest.approx(72.7 / 30, abs=0.01)
    whole = RestoreCostModel(copy, layers=1, first_pass_share=0.15)
    assert whole.delay_ms(4_000_000_000, 363.0) == pytest.approx(72.7, abs=0.1)
    streamed.observe(4_000_000_000, 145.0)  # a slower measured copy moves the delay with it
    assert streamed.delay_ms(4_000_000_000, 363.0) > 20.2
    with pytest.raises(CostModelError):
        RestoreCostModel(copy, layers=0, first_pass_share=0.15)
