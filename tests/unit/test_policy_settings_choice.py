"""The policy runs with the settings bench/choose_settings.py chose on synthetic days, and the record of that
choice agrees with its own rule."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from services.scheduler.policy.registry import CHOSEN

FIRST_CHUNK_RULED = ("ours", "ours_recent_rises")  # as bench/choose_settings.py: its sizing candidate too
REPO = Path(__file__).resolve().parents[2]
RECORD = REPO / "bench" / "results" / "settings.json"


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
            assert policy not in FIRST_CHUNK_RULED or (
                row["worst_first_chunk_p99_s"] <= 2.0 and row["worst_first_chunk_s"] <= 5.0)


def test_the_choice_is_reproduced_from_the_recorded_cases_without_running_one(tmp_path: Path) -> None:
    """--reuse takes every case from the record, so the script runs none (a rerun would take minutes, past the
    timeout) and applies the same rule to the same figures; whatever code made them, since this checks the rule."""
    out = tmp_path / "settings.json"
    script = subprocess.Popen([sys.executable, str(REPO / "bench" / "choose_settings.py"), "--reuse", str(RECORD),
                               "--reuse-other-code", "--out", str(out)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, start_new_session=True)  # its own group: a kill takes its pool
    try:
        _, err = script.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(script.pid, signal.SIGKILL)
        script.wait()
        raise
    assert script.returncode == 0, err.decode()
    again, record = json.loads(out.read_text()), json.loads(RECORD.read_text())
    assert again["chosen"] == record["chosen"]
    assert again["candidates"] == record["candidates"] and again["cases"] == record["cases"]



def test_a_record_made_by_other_code_is_not_reused(tmp_path: Path) -> None:
    """A policy fix moves the figures a record holds: without --reuse-other-code the script takes none of them
    (it says so, then would run every case; it is stopped there)."""
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps({**json.loads(RECORD.read_text()), "code": "other-code"}))
    script = subprocess.Popen([sys.executable, str(REPO / "bench" / "choose_settings.py"), "--reuse", str(stale),
                               "--out", str(tmp_path / "out.json")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    first: list[str] = []
    reader = threading.Thread(target=lambda: first.append(script.stdout.readline() if script.stdout else ""))
    reader.start()
    reader.join(timeout=60)
    os.killpg(script.pid, signal.SIGKILL)
    script.wait()
    assert first and "holds no case of this code" in first[0], first
