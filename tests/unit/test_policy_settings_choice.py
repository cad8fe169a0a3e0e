"""The policy runs with the settings bench/choose_settings.py chose on synthetic days, and the record of that
choice agrees with its own rule."""

from __future__ import annotations

import json
from pathlib import Path

from services.scheduler.policy.registry import CHOSEN

RECORD = Path(__file__).resolve().parents[2] / "bench" / "results" / "settings.json"


def test_the_registry_carries_the_recorded_choice_and_the_choice_follows_the_rule() -> None:
    record = json.loads(RECORD.read_text())
    assert record["chosen"] == CHOSEN
    for policy in CHOSEN:
        rows = [r for r in record["candidates"] if r["policy"] == policy]
        qualified = [r for r in rows if r["qualifies"]]
        (chosen,) = [r for r in rows if r.get("chosen")]
        if qualified:
            assert chosen["mean_cost_vs_lower_bound"] == min(r["mean_cost_vs_lower_bound"] for r in qualified)
        for row in qualified:
            assert row["worst_over_target_frac"] <= 0.001
            assert policy != "ours" or (row["worst_first_chunk_p99_s"] <= 2.0 and row["worst_first_chunk_s"] <= 5.0)
