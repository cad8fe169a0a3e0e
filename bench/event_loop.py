"""uvloop against asyncio's own event loop, in every process of the chunk path (worker, gateway, client).

Rounds alternate between the two loops, each on a fresh system (its own database, one worker) sharing one NATS
server, 8 sessions streaming; the figure per loop is the median over its rounds of the overhead p50 and p99
(e2e - model - this chunk's encode wait, as in ``bench/e2e.py``). Alternating rounds, rather than one block per
loop, spreads this shared machine's slow spells over both. Writes bench/results/event_loop.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import unittest.mock
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

# The repository root in place of bench/ (a script's own folder comes first): bench/kernels.py must not shadow
# the `kernels` package transformers probes for.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.e2e import System, stream_sessions, summarize  # noqa: E402
from services.common import event_loop  # noqa: E402
from services.common.nats_server import start_nats_server  # noqa: E402
from services.common.postgres_server import locate_postgres, scratch_database  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "event_loop.json"
LOOPS = ("asyncio", "uvloop")
console = Console(width=None if sys.stdout.isatty() else 150)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds per event loop")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=40, help="measured chunks per session and round")
    args = parser.parse_args()

    rows: dict[str, list[dict[str, float]]] = {loop: [] for loop in LOOPS}
    nats = start_nats_server()
    postgres = locate_postgres()
    try:
        with Progress(console=console) as progress:
            task = progress.add_task("event loops", total=args.rounds * len(LOOPS))
            for _ in range(args.rounds):
                for loop in LOOPS:
                    env = {event_loop.EVENT_LOOP_ENV: loop}
                    with unittest.mock.patch.dict(os.environ, env), \
                            scratch_database(postgres.url, f"bench_loop_{loop}") as database, \
                            System(nats.url, database, env) as system:
                        event_loop.run(stream_sessions(system.ws_url, args.sessions, 3, 5))  # warm the worker
                        chunks = event_loop.run(stream_sessions(system.ws_url, args.sessions, 3, args.chunks))
                    rows[loop].append(summarize(chunks))
                    progress.advance(task)
    finally:
        nats.stop()
        postgres.stop()

    keys = ("overhead_p50_ms", "overhead_p99_ms", "worker_overhead_p99_ms", "transport_p50_ms", "transport_p99_ms")
    medians = {loop: {key: float(np.median([row[key] for row in rows[loop]])) for key in keys} for loop in LOOPS}
    table = Table(title=f"system overhead at {args.sessions} sessions, median over {args.rounds} rounds per loop (ms)")
    table.add_column("event loop")
    for key in keys:
        table.add_column(key.removesuffix("_ms").replace("_", " "), justify="right")
    for loop in LOOPS:
        table.add_row(loop, *(f"{medians[loop][key]:.2f}" for key in keys))
    console.print(table)
    payload = {
        "sessions": args.sessions,
        "overhead_p50_ms": {loop: medians[loop]["overhead_p50_ms"] for loop in LOOPS},
        "overhead_p99_ms": {loop: medians[loop]["overhead_p99_ms"] for loop in LOOPS},
        "uvloop_over_asyncio_p50": medians["uvloop"]["overhead_p50_ms"] / medians["asyncio"]["overhead_p50_ms"],
        "uvloop_over_asyncio_p99": medians["uvloop"]["overhead_p99_ms"] / medians["asyncio"]["overhead_p99_ms"],
        "medians": medians,
        "rounds": rows,
        "measured_at_unix_s": time.time(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=2))
    console.print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
