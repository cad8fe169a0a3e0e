"""bench/policies.py's frontier: each setting is judged on its worst seed, and a setting meets the targets only
when one seed does not break either of them."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from services.scheduler.policy.registry import CHOSEN

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def policies() -> Iterator[ModuleType]:
    saved = list(sys.path)  # the script points sys.path[0] at the repository root when it loads
    spec = importlib.util.spec_from_file_location("policies_bench", REPO / "bench" / "policies.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]
    sys.path[:] = saved


def _row(policy: str, seed: int, cost: float, over: float, rho: float | None = None,
         coverage: float | None = None) -> dict[str, Any]:
    return {"trace": "mooncake", "load": 16, "seed": seed, "delay_s": 30.0, "policy": policy, "rho": rho,
            "burst_coverage": coverage, "cost_vs_lower_bound": cost, "over_target_frac": over}


def test_a_setting_meets_the_targets_only_on_its_worst_seed(policies: ModuleType, tmp_path: Path) -> None:
    rows = [
        _row("ours", 0, 1.47, 0.0005), _row("ours", 1, 1.52, 0.0004),  # the chosen coverage: seed 1 costs too much
        _row("ours_coverage", 0, 1.45, 0.0008, coverage=0.5), _row("ours_coverage", 1, 1.46, 0.0009, coverage=0.5),
        _row("ours_coverage", 0, 1.40, 0.0006, coverage=0.4), _row("ours_coverage", 1, 1.41, 0.0012, coverage=0.4),
        _row("paper", 0, 1.48, 0.0007, rho=0.7), _row("paper", 1, 1.49, 0.0011, rho=0.7),
        _row("paper", 0, 1.70, 0.0001, rho=0.6), _row("paper", 1, 1.71, 0.0002, rho=0.6),
    ]
    points = {(p["family"], p["setting"]): p for p in policies.frontier(rows)}
    chosen = points[("ours", CHOSEN["ours"]["burst_coverage"])]
    assert chosen["chosen"] and chosen["seeds"] == 2 and chosen["cost_vs_lower_bound_worst"] == 1.52
    assert not chosen["meets_both"]  # though its mean cost, 1.495x, is within 1.5x
    assert points[("ours", 0.5)]["meets_both"]
    assert not points[("ours", 0.4)]["meets_both"]  # cheapest, and 0.09% on the mean, but seed 1 is over
    assert not points[("paper", 0.7)]["meets_both"] and not points[("paper", 0.6)]["meets_both"]
    (line,) = policies.frontier_verdicts(list(points.values()))
    assert "every seed: ours 0.5;" in line
    assert "ours coverage 0.5 at 1.460x" in line and "paper rho 0.6 at 1.710x" in line
    policies.plot_frontier_panels(list(points.values()), tmp_path)
    assert (tmp_path / "policies_frontier.png").stat().st_size > 0


def test_the_cost_split_shows_each_policy_by_use_and_the_need_its_pool_left_unmet(policies: ModuleType,
                                                                                 tmp_path: Path) -> None:
    uses = {"ours": (0.98, 0.12, 0.35, 0.08), "paper": (0.93, 0.14, 0.03, 0.02), "round_robin": (1.0, 0.1, 0.1, 0.1)}
    rows = []
    for policy, (serving, provisioning, headroom, held) in uses.items():
        for seed, shift in ((0, 0.0), (1, 0.02)):
            split = {"serving_vs_lower_bound": serving - shift, "provisioning_vs_lower_bound": provisioning,
                     "headroom_vs_lower_bound": headroom + shift, "held_vs_lower_bound": held,
                     "after_release_vs_lower_bound": 0.0}
            rows.append({**_row(policy, seed, sum(split.values()), 0.0005), **split,
                         "clairvoyant_vs_lower_bound": 1.15, "over_interval_frac": 0.0, "worst_latency_ms": 400.0,
                         "first_chunk_p50_s": 0.4, "first_chunk_p99_s": 1.0, "first_chunk_max_s": 1.9,
                         "migrations_per_session_hour": 0.1, "gb_moved_per_gpu_hour": 1.0})
    split = policies.cost_split(policies.summarise(rows))
    assert [r["policy"] for r in split] == ["ours", "paper"]  # the policies the split shows, in its order
    ours = split[0]
    assert ours["serving"] == pytest.approx(0.97) and ours["headroom"] == pytest.approx(0.36)  # mean of 2 seeds
    assert ours["unmet"] == pytest.approx(0.03) and ours["clairvoyant_vs_lower_bound"] == 1.15
    assert ours["cost_vs_lower_bound"] == pytest.approx(0.97 + 0.12 + 0.36 + 0.08)
    path = tmp_path / "split.png"
    policies.plot_cost_split(split, policies.GPU_USES, path)
    assert path.stat().st_size > 0
