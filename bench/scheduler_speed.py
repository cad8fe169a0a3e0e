"""Decision time per scheduling event at 4 to 1,024 GPUs (about K sessions per GPU): our indexed controller
against the paper's rule as described (full rescans), in the same run, on the same event sequence.

Each event turns one resident session idle and resumes one offloaded session, then decides (with rebalancing
due, the worst case) and applies the plan. The first ``warmup`` events are not timed: there our controller
consolidates the deliberately loose starting cluster once (a one-off, proportional to the moves). Times are
CPU time of the deciding process (``time.process_time_ns``), so other load on a shared machine does not
inflate them. Writes bench/results/scheduler_speed.json.

    .venv/bin/python bench/scheduler_speed.py [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO_ROOT)  # in place of bench/, whose kernels.py would shadow the `kernels` package

from services.scheduler.policy.apply import apply_plan  # noqa: E402
from services.scheduler.policy.controller import ClosedLoopController  # noqa: E402
from services.scheduler.policy.naive_paper import NaivePaperScheduler  # noqa: E402
from services.scheduler.policy.registry import PolicySetting, build_controller  # noqa: E402
from services.scheduler.policy.snapshot import ClusterSnapshot, GpuView, SessionView  # noqa: E402

STATE_BYTES = 3_500_000_000
CAPACITY = 4


def build_cluster(gpus: int, seed: int) -> ClusterSnapshot:
    """``gpus`` ready GPUs holding 3 or 4 active sessions each, and as many offloaded idle sessions."""
    rng = random.Random(seed)
    snapshot = ClusterSnapshot()
    for index in range(gpus):
        snapshot.upsert_gpu(GpuView(f"g{index:05d}", "h100", CAPACITY, 0.0))
    counter = 0
    for index in range(gpus):
        for _ in range(rng.choice((3, 4))):
            snapshot.upsert_session(SessionView(f"s{counter}", STATE_BYTES, True, f"g{index:05d}"))
            counter += 1
    for _ in range(gpus * CAPACITY):
        snapshot.upsert_session(SessionView(f"s{counter}", STATE_BYTES, False, None, None, True))
        counter += 1
    return snapshot


def _take(items: list[str], rng: random.Random) -> str:
    """Remove and return a random element in O(1) (swap with the last)."""
    index = rng.randrange(len(items))
    items[index], items[-1] = items[-1], items[index]
    return items.pop()


def measure(impl: str, gpus: int, events: int, seed: int, warmup: int) -> dict[str, float | int | str]:
    snapshot = build_cluster(gpus, seed)
    setting = PolicySetting(provisioning_delay_s=30.0, max_gpus=100_000)
    decider: ClosedLoopController | NaivePaperScheduler
    if impl == "ours":
        decider = build_controller("ours", setting)
    else:
        models = setting.models()
        decider = NaivePaperScheduler(models.latency, models.migration, setting.scale_kind)
    rng = random.Random(seed + 1)
    sessions = snapshot.sessions
    actives = [sid for sid, s in sessions.items() if s.active]
    idles = [sid for sid, s in sessions.items() if not s.active]
    durations_ms: list[float] = []
    new_ids = (f"n{n:05d}" for n in itertools.count())
    latency = setting.models().latency
    for event in range(warmup + events):
        now_s = 10.0 * (event + 1)
        resumed = _take(idles, rng)
        r = sessions[resumed]
        snapshot.upsert_session(SessionView(resumed, r.state_bytes, True, None, r.last_migrated_at_s, True))
        paused = _take(actives, rng)
        p = sessions[paused]
        snapshot.upsert_session(SessionView(paused, p.state_bytes, False, p.gpu_id, p.last_migrated_at_s, p.offloaded))
        actives.append(resumed)
        idles.append(paused)
        started = time.process_time_ns()
        plan = decider.decide(snapshot, now_s)
        if event >= warmup:
            durations_ms.append((time.process_time_ns() - started) / 1e6)
        apply_plan(snapshot, plan, now_s, 0.0, latency, new_ids)
    durations_ms.sort()
    return {
        "gpus": gpus,
        "sessions": snapshot.active_count,
        "impl": impl,
        "events": events,
        "median_ms": round(statistics.median(durations_ms), 4),
        "p99_ms": round(durations_ms[min(len(durations_ms) - 1, int(0.99 * len(durations_ms)))], 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer events per size")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "scheduler_speed.json")
    args = parser.parse_args()
    rows = []
    for gpus in (4, 16, 64, 256, 1024):
        for impl in ("ours", "paper"):
            budget = 40_000 if impl == "paper" else 400_000
            events = max(5, min(300 if not args.quick else 60, budget // gpus))
            row = measure(impl, gpus, events, seed=gpus, warmup=10 if impl == "ours" else 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
