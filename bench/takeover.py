"""Takeover: how soon a standby scheduler leads after the leader is killed with kill -9.

Run: ``.venv/bin/python bench/takeover.py`` (under a minute). Writes ``bench/results/takeover.json``: ``takeover_s``
(one per trial), ``median_s``, ``max_s`` and ``poll_s``, the standby's polling interval, which bounds them.

The leader is a process of its own holding the lead (``services.scheduler.leadership``) on a PostgreSQL of this
run (the local server, or an embedded one); the standby polls beside it in this process. Each trial kills the
leader, at a point spread evenly over the standby's polling interval from trial to trial, and times the standby from
the kill to holding the lock: the lock is released with the leader's socket, so the figure is the wait for the next
poll, half of ``poll_s`` on average, plus PostgreSQL's own reaction.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The repository root in place of bench/ (a script's own folder comes first): bench/kernels.py must not shadow
# the `kernels` package transformers probes for.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

from services.common.postgres_server import locate_postgres, scratch_database  # noqa: E402
from services.scheduler.leadership import Leadership  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "takeover.json"
console = Console(width=None if sys.stdout.isatty() else 150)
LEADER = """
import asyncio, sys
from services.scheduler.leadership import Leadership

async def lead() -> None:
    leadership = Leadership(sys.argv[1])  # held: the lock lives with its connection
    assert await leadership.acquire(asyncio.Event())
    print("leading", flush=True)
    await asyncio.sleep(3600)

asyncio.run(lead())
"""


async def one_takeover(database_url: str, poll_s: float, phase: float) -> float:
    leader = subprocess.Popen([sys.executable, "-c", LEADER, database_url], stdout=subprocess.PIPE,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        assert leader.stdout is not None and leader.stdout.readline().strip() == b"leading"
        standby = Leadership(database_url, poll_s=poll_s)
        waiting = asyncio.create_task(standby.acquire(asyncio.Event()))
        await asyncio.sleep(poll_s * (2 + phase))  # the kill lands anywhere within a poll's interval
        assert not waiting.done(), "the standby led beside a live leader"
        killed_s = time.monotonic()
        leader.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(waiting, timeout=30.0)
        took_s = time.monotonic() - killed_s
        await standby.close()
        return took_s
    finally:
        leader.kill()
        leader.wait()


async def run(args: argparse.Namespace) -> int:
    postgres = locate_postgres()
    try:
        with scratch_database(postgres.url, "turboserve_takeover") as database_url, Progress(console=console) as bar:
            task = bar.add_task("kill -9 the leader", total=args.trials)
            times = []
            for trial in range(args.trials):
                times.append(await one_takeover(database_url, args.poll_s, (trial + 0.5) / args.trials))
                bar.advance(task)
    finally:
        postgres.stop()
    result = {"poll_s": args.poll_s, "takeover_s": times, "median_s": statistics.median(times), "max_s": max(times),
              "postgres": postgres.source}
    table = Table(title=f"standby leads after kill -9 of the leader ({args.trials} trials, PostgreSQL: "
                  f"{postgres.source}, polling every {args.poll_s:g} s)")
    for column in ("median (s)", "max (s)", "every trial (s)"):
        table.add_column(column, justify="right")
    table.add_row(f"{result['median_s']:.2f}", f"{result['max_s']:.2f}", " ".join(f"{t:.2f}" for t in times))
    console.print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {RESULTS}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--poll-s", type=float, default=1.0, help="the standby's polling interval (the default's)")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
