"""A GPU released before its paid time runs out saves nothing: the simulator charges by the billing model, and
ours keeps a surplus GPU until just before its next increment."""

from __future__ import annotations

import pytest

from services.scheduler.policy.actions import DrainGpu, RemoveGpu
from services.scheduler.policy.billing import Billing, BillingError
from services.scheduler.policy.controller import RELEASE_LEAD_S
from services.scheduler.policy.registry import PolicySetting, build_controller
from services.scheduler.policy.snapshot import ClusterSnapshot, GpuView, SessionView
from services.scheduler.sim.engine import SimConfig, Simulator
from services.scheduler.sim.results import SimResult
from services.scheduler.sim.trace import SessionTrace, Trace

GB = 1_000_000_000
HOURLY = {"billing_minimum_s": 3600.0, "billing_increment_s": 3600.0}


def test_a_gpu_is_charged_its_minimum_then_whole_increments_and_to_the_instant_by_default() -> None:
    assert Billing().charged_s(12.3) == 12.3 and Billing().paid_until_s(100.0, 112.3) == 112.3
    per_minute = Billing(minimum_s=60.0)
    assert per_minute.charged_s(12.0) == 60.0 and per_minute.charged_s(75.5) == 75.5
    hourly = Billing(3600.0, 3600.0)
    assert [hourly.charged_s(s) for s in (1.0, 3600.0, 3601.0)] == [3600.0, 3600.0, 7200.0]
    assert hourly.paid_until_s(100.0, 3700.0) == 3700.0 and hourly.paid_until_s(100.0, 3701.0) == 7300.0


@pytest.mark.parametrize(("minimum_s", "increment_s"), [(-1.0, 0.0), (0.0, -1.0), (float("nan"), 0.0)])
def test_a_billing_no_cloud_has_is_a_typed_error(minimum_s: float, increment_s: float) -> None:
    with pytest.raises(BillingError):
        Billing(minimum_s, increment_s)


def cluster_with_surplus() -> ClusterSnapshot:
    """Four sessions on one GPU of four, all asked for at 0 s: two are surplus (ours keeps one warm spare)."""
    snapshot = ClusterSnapshot()
    for index in range(4):
        snapshot.upsert_gpu(GpuView(f"g{index}", "h100", 4, 0.0, billed_since_s=0.0))
    for index in range(4):
        snapshot.upsert_session(SessionView(f"s{index}", 3 * GB, True, "g0"))
    return snapshot


def first_release_s(policy: str, **setting: float) -> float:
    controller = build_controller(policy, PolicySetting(burst_coverage=0.0, **setting))  # type: ignore[arg-type]
    snapshot = cluster_with_surplus()
    for now_s in range(0, 2 * 3600, 10):
        plan = controller.decide(snapshot, float(now_s))
        if any(isinstance(action, (RemoveGpu, DrainGpu)) for action in plan.actions):
            assert plan.target_gpus == 2
            return float(now_s)
    raise AssertionError("no GPU released in two hours")


def test_ours_keeps_a_surplus_gpu_while_it_is_paid_for_and_releases_it_before_the_next_hour() -> None:
    assert first_release_s("ours") < 120.0  # billed to the instant: after the scale-in hold
    assert first_release_s("ours_billing_blind", **HOURLY) < 120.0
    assert 3600.0 - RELEASE_LEAD_S <= first_release_s("ours", **HOURLY) < 3600.0


def replay(policy: str, **setting: float) -> SimResult:
    """Eight sessions for a minute: the autoscaled GPUs are released well inside a 60 s minimum."""
    sessions = tuple(SessionTrace(f"s{i}", ((100.0, 160.0),), 160.0, 3 * GB) for i in range(8))
    stays = SessionTrace("stays", ((100.0, 1200.0),), 1200.0, 3 * GB)
    policy_setting = PolicySetting(**setting)  # type: ignore[arg-type]
    truth = policy_setting.models()
    config = SimConfig(billing=policy_setting.billing())
    return Simulator(Trace("t", (*sessions, stays), 0.0, 1200.0), build_controller(policy, policy_setting), config,
                     truth.latency, truth.migration, truth.restore).run()


def test_the_simulator_charges_a_minimum_not_used_up_at_the_release() -> None:
    free, minimum = replay("paper"), replay("paper", billing_minimum_s=600.0)  # the paper's rule ignores billing
    assert free.counters == minimum.counters  # the same decisions, so only the bill differs
    assert free.gpu_hours_by_use["after_release"] == 0.0
    assert minimum.gpu_hours_by_use["after_release"] > 0.0
    assert minimum.gpu_hours == pytest.approx(free.gpu_hours + minimum.gpu_hours_by_use["after_release"])
    kept, blind = replay("ours", billing_minimum_s=600.0), replay("ours_billing_blind", billing_minimum_s=600.0)
    assert kept.gpu_hours < blind.gpu_hours  # what it pays for anyway, it keeps as headroom
    assert blind.gpu_hours_by_use["after_release"] > 0.1
    removed = kept.counters["gpus_removed"]
    assert removed > 0 and kept.gpu_hours_by_use["after_release"] <= removed * RELEASE_LEAD_S / 3600.0
