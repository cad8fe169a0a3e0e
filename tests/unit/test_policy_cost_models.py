"""The fitted latency and transfer models start at the reference defaults and follow measured samples."""

from __future__ import annotations

import pytest

from services.scheduler.policy.cost_models import CostModelError, LatencyCurve, LatencyModel, TransferCostModel


def test_reference_curve_gives_363_ms_for_a_full_gpu_and_180_ms_for_one_session() -> None:
    curve = LatencyCurve()
    assert curve.chunk_latency_ms(1) == pytest.approx(180.0 + 18.0 / 16)
    assert curve.chunk_latency_ms(4) == pytest.approx(180.0 + 3 * 55.0 + 18.0)
    assert curve.chunk_latency_ms(0) == 0.0


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
