"""End-to-end latency and coalescing benchmark through the real system (gateway, NATS, scheduler, worker).

Per chunk: e2e = client receipt - the moment the chunk became ready at the worker (same host, wall clocks);
model = the batched forward that produced it; overhead = e2e - model. Coalesced throughput at 8 sessions is
measured against the same worker serving one session at a time (TURBOSERVE_MAX_BATCH=1), in the same run.
Tracing overhead: 8 sessions with tracing off and on (exporting by OTLP/HTTP to a local receiver, as to Jaeger),
alternating over a few fresh systems so drift hits both; ``tracing_overhead_frac`` compares their median e2e.
Writes bench/results/e2e.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.client import ReceivedChunk, ServerError, TurboServeClient  # noqa: E402
from services.common.nats_server import free_port, start_nats_server  # noqa: E402
from services.common.postgres_server import locate_postgres  # noqa: E402
from services.launcher import Child, start_services, stop_children, wait_http_ok  # noqa: E402
from tests.otlp_receiver import OtlpReceiver  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "e2e.json"
TOKEN = "bench-token"
console = Console()


async def _start(client: TurboServeClient, prompt: str, seed: int) -> str:
    for _ in range(200):
        try:
            return str((await client.start(prompt, seed))["session_id"])
        except ServerError as exc:
            if exc.code != "unavailable":
                raise
            await asyncio.sleep(0.1)
    raise RuntimeError("no worker registered")


async def stream_sessions(ws_url: str, sessions: int, warmup: int, measured: int) -> list[ReceivedChunk]:
    """Open `sessions` sessions (one connection each), drop `warmup` chunks each, keep `measured` each."""
    clients = [await TurboServeClient.connect(ws_url, TOKEN) for _ in range(sessions)]
    try:
        ids = [await _start(c, f"benchmark stream {i}", seed=i) for i, c in enumerate(clients)]

        async def one(client: TurboServeClient, session_id: str) -> list[ReceivedChunk]:
            chunks = [await client.next_chunk(session_id, timeout_s=120) for _ in range(warmup + measured)]
            await client.close_session(session_id)
            return chunks[warmup:]

        per_session = await asyncio.gather(*(one(c, s) for c, s in zip(clients, ids, strict=True)))
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    return [chunk for chunks in per_session for chunk in chunks]


def tracing_env(otlp_endpoint: str) -> dict[str, str]:
    return {
        "TURBOSERVE_TRACING": "1", "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
    }


def compare_tracing(nats_url: str, database_url: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """8 sessions with tracing off and on, ``args.tracing_rounds`` pairs, the order flipped every round so a
    drifting machine favours neither; latencies pool every chunk of a condition (chunks/s would span several
    systems, so it is left out)."""
    pooled: dict[str, list[ReceivedChunk]] = {"off": [], "on": []}
    with OtlpReceiver() as receiver:
        conditions = [("off", {}), ("on", tracing_env(receiver.endpoint))]
        for _ in range(args.tracing_rounds):
            for condition, env in conditions:
                with System(nats_url, database_url, env) as system:
                    pooled[condition] += asyncio.run(stream_sessions(system.ws_url, 8, args.warmup, args.chunks))
            conditions.reverse()
        spans = len(receiver.spans)
    summaries = {condition: summarize(chunks) for condition, chunks in pooled.items()}
    for summary in summaries.values():
        del summary["chunks_per_s"]
    summaries["on"]["spans_received"] = float(spans)
    return summaries


def summarize(chunks: list[ReceivedChunk]) -> dict[str, float]:
    e2e = np.array([c.received_at_unix_ms - c.header.timings_ms["ready_at_unix_ms"] for c in chunks])
    model = np.array([c.header.timings_ms["model_ms"] for c in chunks])
    first = min(c.received_at_unix_ms for c in chunks)
    last = max(c.received_at_unix_ms for c in chunks)
    return {
        "e2e_p50_ms": float(np.percentile(e2e, 50)), "e2e_p99_ms": float(np.percentile(e2e, 99)),
        "model_ms": float(np.median(model)), "overhead_p50_ms": float(np.percentile(e2e - model, 50)),
        "overhead_p99_ms": float(np.percentile(e2e - model, 99)),
        "encode_ms": float(np.median([c.header.timings_ms["encode_ms"] for c in chunks])),
        "mean_batch": float(np.mean([c.header.timings_ms["batch"] for c in chunks])),
        "chunks_per_s": (len(chunks) - 1) / max((last - first) / 1e3, 1e-9),
    }


class System:
    """One worker (so every session shares its batches), scheduler, state store and gateway."""

    def __init__(self, nats_url: str, database_url: str, extra_env: dict[str, str]) -> None:
        self.port = free_port()
        self.log_dir = Path(tempfile.mkdtemp(prefix="turboserve-bench-"))
        self.env = {
            **os.environ, "NATS_URL": nats_url, "DATABASE_URL": database_url, "TURBOSERVE_MODEL": "tiny",
            "TURBOSERVE_TOKENS": TOKEN, "TURBOSERVE_GATEWAY_PORT": str(self.port), "TURBOSERVE_WORKER_CAPACITY": "32",
            "TURBOSERVE_MAX_RESIDENT": "64", "TURBOSERVE_MAX_SESSIONS_PER_TOKEN": "64", "PYTHONUNBUFFERED": "1",
            **extra_env,
        }
        if "TURBOSERVE_TRACING" not in extra_env:
            self.env["TURBOSERVE_TRACING"] = "0"
        self.children: list[Child] = []

    def __enter__(self) -> System:
        self.children = start_services(self.env, workers=1, log_dir=self.log_dir)
        wait_http_ok(f"http://127.0.0.1:{self.port}/healthz", self.children, timeout_s=90)
        return self

    def __exit__(self, *exc: object) -> None:
        stop_children(self.children)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--chunks", type=int, default=20, help="measured chunks per session")
    parser.add_argument("--tracing-rounds", type=int, default=3, help="off/on pairs in the tracing comparison")
    args = parser.parse_args()

    nats = start_nats_server()
    postgres = locate_postgres()
    results: dict[str, dict[int, dict[str, float]]] = {}
    try:
        with Progress(console=console) as progress:
            task = progress.add_task("e2e benchmark", total=len(args.sessions) + 2)
            with System(nats.url, postgres.url, {}) as system:
                for count in args.sessions:
                    chunks = asyncio.run(stream_sessions(system.ws_url, count, args.warmup, args.chunks))
                    results.setdefault("batched", {})[count] = summarize(chunks)
                    progress.advance(task)
            with System(nats.url, postgres.url, {"TURBOSERVE_MAX_BATCH": "1"}) as system:
                chunks = asyncio.run(stream_sessions(system.ws_url, 8, args.warmup, args.chunks))
                results["one_at_a_time"] = {8: summarize(chunks)}
                progress.advance(task)
            tracing = compare_tracing(nats.url, postgres.url, args)
            progress.advance(task)
    finally:
        nats.stop()
        postgres.stop()

    batched = results["batched"]
    table = Table(title="end-to-end per-chunk latency, tiny model, one worker")
    for column in ("sessions", "e2e p50 ms", "e2e p99 ms", "model ms", "overhead p50", "overhead p99",
                   "encode ms", "mean batch", "chunks/s"):
        table.add_column(column, justify="right")
    for count, row in batched.items():
        table.add_row(str(count), *(f"{row[k]:.1f}" for k in (
            "e2e_p50_ms", "e2e_p99_ms", "model_ms", "overhead_p50_ms", "overhead_p99_ms", "encode_ms",
            "mean_batch", "chunks_per_s")))
    console.print(table)
    speedup = batched[8]["chunks_per_s"] / results["one_at_a_time"][8]["chunks_per_s"] if 8 in batched else None
    if speedup is not None:
        console.print(f"coalesced throughput at 8 sessions: {batched[8]['chunks_per_s']:.1f} chunks/s vs "
                      f"{results['one_at_a_time'][8]['chunks_per_s']:.1f} one at a time = {speedup:.2f}x")
    off_ms, on_ms = tracing["off"]["e2e_p50_ms"], tracing["on"]["e2e_p50_ms"]
    overhead_frac = on_ms / off_ms - 1
    console.print(f"tracing at 8 sessions: e2e p50 {off_ms:.1f} ms off, {on_ms:.1f} ms on = {overhead_frac:+.1%} "
                  "(target: at most +5%)")
    payload = {
        "sessions": list(batched),
        "e2e_p50_ms": {n: r["e2e_p50_ms"] for n, r in batched.items()},
        "e2e_p99_ms": {n: r["e2e_p99_ms"] for n, r in batched.items()},
        "model_ms": {n: r["model_ms"] for n, r in batched.items()},
        "overhead_p99_ms": {n: r["overhead_p99_ms"] for n, r in batched.items()},
        "coalesced_speedup": speedup,
        "tracing_overhead_frac": overhead_frac,
        "tracing": tracing,
        "detail": results,
        "measured_at_unix_s": time.time(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=2))
    console.print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
