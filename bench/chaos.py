"""Chaos: 16 sessions stream (tiny model) while one fault at a time hits the system; what each client saw.

Run: ``.venv/bin/python bench/chaos.py`` (a few minutes). Writes ``bench/results/chaos.json`` (``faults``: one
entry per fault) and ``bench/results/chaos_gaps.png`` (each client's waits between chunks around the fault).

The system: a 3-node NATS cluster (snapshots replicated 3 times), PostgreSQL (an embedded server of this run's own,
so that it can be crashed and restarted; a ``DATABASE_URL`` is used as given and that fault skipped), the
scheduler, the state store, three workers and two gateways, all separate processes. A killed service is started
again a second later, as ``turboserve up``'s supervisor does. Every client checks its stream itself: a seq
twice (duplicated), a seq below the last (reordered), a seq skipped (lost), and every chunk's frames against an
undisturbed run of the same session. When its gateway dies the client reconnects through the other one and
resumes at the seq after the last it holds. Generation is paced to playback (a 12-frame chunk every 750 ms at
16 fps, two chunks ahead), so a client holds up to ~1.5 s of picture when a fault hits: "longest gap" is the
longest wait between two chunks' arrivals, "stalls" / "longest stall" what a 16 fps player showed frozen (the
arrivals replayed through the gateway's playback model).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The repository root in place of bench/ (a script's own folder comes first): bench/kernels.py must not shadow
# the `kernels` package transformers probes for.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import psycopg  # noqa: E402
from PIL import Image  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from services.client import ReceivedChunk, ServerError, TurboServeClient  # noqa: E402
from services.common.nats_server import NatsServer, free_port, start_nats_cluster  # noqa: E402
from services.common.postgres_server import PostgresHandle, locate_postgres  # noqa: E402
from services.gateway.playback import PlaybackClock  # noqa: E402
from services.gpu_worker.model.synth import temporary_synthetic_dir  # noqa: E402
from services.launcher import (  # noqa: E402
    Child,
    drop_database,
    instance_database,
    restart_service,
    start_services,
    stop_children,
    wait_http_ok,
)

RESULTS = Path(__file__).parent / "results" / "chaos.json"
PLOT = Path(__file__).parent / "results" / "chaos_gaps.png"
TOKEN = "chaos-token"
FRAME_TOLERANCE = 1.0
"""Mean JPEG levels two runs of the same session may differ by (batched sums reorder; the encoder rounds): up to
0.05 measured here, against about 34 between two different sessions."""
console = Console(width=150)
PLAYBACK_FPS = 16.0
POSTGRES_DOWN_S = 3.0
"""Long enough that every service meets the outage (leases, heartbeats, a decision round), short enough to wait."""


class ChaosSystem:
    def __init__(self, database_url: str, nats: list[NatsServer], postgres: PostgresHandle) -> None:
        self.nats = nats
        self.postgres = postgres
        self.ports = [free_port(), free_port()]
        self.log_dir = Path(tempfile.mkdtemp(prefix="turboserve-chaos-"))
        self.env = {
            **os.environ, "NATS_URL": ",".join(n.url for n in nats), "DATABASE_URL": database_url,
            "TURBOSERVE_MODEL": "tiny", "TURBOSERVE_MODEL_DIR": str(temporary_synthetic_dir("tiny")),
            "TURBOSERVE_TOKENS": TOKEN, "TURBOSERVE_GATEWAY_PORT": str(self.ports[0]),
            "TURBOSERVE_WORKER_CAPACITY": "8", "TURBOSERVE_CAPACITY_FROM": "setting",  # faults, not capacity
            "TURBOSERVE_MAX_SESSIONS_PER_TOKEN": "64",
            "TURBOSERVE_SNAPSHOT_EVERY_CHUNKS": "4", "TURBOSERVE_SNAPSHOT_REPLICAS": "3",
            "TURBOSERVE_HEARTBEAT_S": "0.25", "TURBOSERVE_WORKER_TIMEOUT_S": "1.5", "TURBOSERVE_TRACING": "0",
            "TURBOSERVE_LEASE_S": "3", "TURBOSERVE_LINGER_S": "5", "PYTHONUNBUFFERED": "1",
        }
        self.children: list[Child] = []

    def start(self) -> None:
        self.children = start_services(self.env, workers=3, log_dir=self.log_dir, more_gateway_ports=self.ports[1:])
        self.wait_ready()

    def wait_no_open_sessions(self, timeout_s: float = 60.0) -> int:
        """Until every session of the last fault is closed (a lingering one holds a worker slot); returns how
        many were still open after the clients' own closes."""
        deadline = time.monotonic() + timeout_s
        first: int | None = None
        while True:
            with psycopg.connect(self.env["DATABASE_URL"]) as conn:
                row = conn.execute("select count(*) from sessions where status <> 'closed'").fetchone()
            open_now = int(row[0]) if row else 0
            first = open_now if first is None else first
            if open_now == 0 or time.monotonic() > deadline:
                return first
            time.sleep(0.5)

    def wait_ready(self) -> None:
        """Both gateways answer (a restarted one takes a few seconds)."""
        for port in self.ports:
            wait_http_ok(f"http://127.0.0.1:{port}/healthz", self.children, timeout_s=90)

    def stop(self, keep_logs: bool = False) -> None:
        stop_children(self.children)
        if keep_logs:
            console.print(f"logs kept in {self.log_dir}")
        else:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    @property
    def ws_urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{port}/ws" for port in self.ports]

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def restart(self, name: str) -> None:
        restart_service(self.children, name, self.env, self.log_dir, self.ports[1:])


@dataclass
class Stream:
    """One client's session as it saw it."""

    index: int
    prompt: str
    seed: int
    session_id: str = ""
    chunks: list[ReceivedChunk] = field(default_factory=list)
    duplicated: int = 0
    reordered: int = 0
    lost: int = 0
    lost_session: str = ""
    reconnects: int = 0

    def take(self, chunk: ReceivedChunk) -> None:
        last = self.chunks[-1].header.seq if self.chunks else -1
        seq = chunk.header.seq
        if any(c.header.seq == seq for c in self.chunks):
            self.duplicated += 1
            return
        if seq < last:
            self.reordered += 1
            return
        self.lost += seq - last - 1
        self.chunks.append(chunk)


def playback_stalls(stream: Stream, after_ms: float) -> list[float]:
    """How long the picture froze (s) each time a chunk that arrived after ``after_ms`` came after the previous one
    finished playing, replaying the arrivals through the gateway's own model of a 16 fps player."""
    clock = PlaybackClock(fps=PLAYBACK_FPS, lead_chunks=2, next_seq=stream.chunks[0].header.seq if stream.chunks else 0)
    stalls = []
    for chunk in stream.chunks:
        before = clock.stalled_s
        clock.delivered(chunk.header.seq, len(chunk.frames), chunk.received_at_unix_ms / 1e3)
        if clock.stalled_s > before and chunk.received_at_unix_ms >= after_ms:
            stalls.append(clock.stalled_s - before)
    return stalls


async def start(client: TurboServeClient, prompt: str, seed: int) -> str:
    """Start a session; right after the system starts (or a fault) the scheduler may not have heard its workers
    yet: retry that one answer for a while."""
    last = ""
    for _ in range(300):
        try:
            return str((await client.start(prompt, seed))["session_id"])
        except ServerError as exc:
            if exc.code != "unavailable":
                raise
            last = str(exc)
            await asyncio.sleep(0.1)
    raise RuntimeError(f"no session could start within 30 s: {last}")


async def close(client: TurboServeClient, session_id: str) -> None:
    """Close and wait for the answer (a session left to linger would hold its worker slot for a minute);
    notices that the session moved may come first."""
    with contextlib.suppress(Exception):
        await client.send({"type": "close", "session_id": session_id})
        for _ in range(8):
            with contextlib.suppress(ServerError):
                await client.expect("closed", timeout_s=10)
                return


def frames_of(chunk: ReceivedChunk) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(f))) for f in chunk.frames]).astype(np.int16)


async def run_stream(stream: Stream, urls: list[str], before: int, after: int, fault_at: asyncio.Event,
                     done_before: asyncio.Event) -> None:
    """Start, take ``before`` chunks, wait for the fault, take ``after`` more, reconnecting through the other
    gateway when this one is gone; close."""
    url = 0
    client = await TurboServeClient.connect(urls[url], TOKEN)
    try:
        stream.session_id = await start(client, stream.prompt, stream.seed)
        while len(stream.chunks) < before:
            stream.take(await client.next_chunk(stream.session_id, timeout_s=30))
        done_before.set()
        await fault_at.wait()
        deadline = time.monotonic() + 60
        while len(stream.chunks) < before + after and time.monotonic() < deadline:
            try:
                stream.take(await client.next_chunk(stream.session_id, timeout_s=0.5))
            except (ConnectionClosed, TimeoutError, ServerError, OSError):
                if client.connected:
                    continue  # a slow chunk (or a notice that the session moved), not a dead gateway
                url = (url + 1) % len(urls)
                with contextlib.suppress(Exception):
                    await client.close()
                client = await TurboServeClient.connect(urls[url], TOKEN)
                next_seq = stream.chunks[-1].header.seq + 1 if stream.chunks else 0
                await client.resume(stream.session_id, next_seq=next_seq)
                stream.reconnects += 1
        if len(stream.chunks) < before + after:
            stream.lost_session = f"only {len(stream.chunks)} of {before + after} chunks within 60 s"
        await close(client, stream.session_id)
    finally:
        with contextlib.suppress(Exception):
            await client.close()


Inject = Callable[[ChaosSystem, str], Awaitable[None]]
"""Hit the system; the second argument is the worker serving the most sessions just now (the worker faults' victim)."""


@dataclass
class Fault:
    name: str
    inject: Inject


def kill_and_restart(name: Callable[[str], str]) -> Inject:
    async def inject(system: ChaosSystem, busiest_worker: str) -> None:
        victim = name(busiest_worker)
        system.child(victim).process.send_signal(signal.SIGKILL)
        await asyncio.sleep(1.0)
        system.restart(victim)
    return inject


async def kill_nats_node(system: ChaosSystem, busiest_worker: str) -> None:
    system.nats[0].process.send_signal(signal.SIGKILL)


async def restart_postgres(system: ChaosSystem, busiest_worker: str) -> None:
    await asyncio.to_thread(system.postgres.crash_and_restart, POSTGRES_DOWN_S)


async def freeze_worker(system: ChaosSystem, busiest_worker: str) -> None:
    process = system.child(busiest_worker).process
    process.send_signal(signal.SIGSTOP)
    await asyncio.sleep(10.0)
    process.send_signal(signal.SIGCONT)


FAULTS = [
    Fault("kill -9 a worker", kill_and_restart(lambda busiest: busiest)),
    Fault("kill -9 the scheduler", kill_and_restart(lambda _: "scheduler")),
    Fault("kill -9 a gateway", kill_and_restart(lambda _: "gateway")),
    Fault("kill -9 the state store", kill_and_restart(lambda _: "state-store")),
    Fault("kill -9 a NATS node", kill_nats_node),
    Fault(f"PostgreSQL down {POSTGRES_DOWN_S:.0f} s (crash, restart)", restart_postgres),
    Fault("SIGSTOP a worker for 10 s", freeze_worker),
]


async def reference(urls: list[str], streams: list[Stream], count: int) -> dict[int, list[np.ndarray]]:
    """Each session undisturbed, for the frame comparison; all at once, as the disturbed ones ran (paced to
    playback, one after another would take count x 0.75 s each)."""
    client = await TurboServeClient.connect(urls[0], TOKEN)

    async def undisturbed(stream: Stream) -> list[np.ndarray]:
        session_id = await start(client, stream.prompt, stream.seed)
        frames = [frames_of(await client.next_chunk(session_id, timeout_s=30)) for _ in range(count)]
        await close(client, session_id)
        return frames

    try:
        runs = await asyncio.gather(*(undisturbed(stream) for stream in streams))
    finally:
        await client.close()
    return {stream.index: run for stream, run in zip(streams, runs, strict=True)}


async def one_fault(system: ChaosSystem, fault: Fault, sessions: int, before: int, after: int,
                    seed_base: int) -> tuple[dict[str, Any], list[Stream], float]:
    streams = [Stream(i, f"chaos {fault.name} {i}", seed_base + i) for i in range(sessions)]
    fault_at = asyncio.Event()
    ready = [asyncio.Event() for _ in streams]
    tasks = [asyncio.create_task(run_stream(s, system.ws_urls, before, after, fault_at, r))
             for s, r in zip(streams, ready, strict=True)]
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), timeout=120)
    serving = [s.chunks[-1].header.worker_id for s in streams if s.chunks]
    busiest = max(set(serving), key=serving.count)
    fault_ms = time.time() * 1e3
    fault_at.set()
    await fault.inject(system, busiest)
    for stream, result in zip(streams, await asyncio.gather(*tasks, return_exceptions=True), strict=True):
        if isinstance(result, BaseException):
            stream.lost_session = stream.lost_session or f"client failed: {result!r}"
    await asyncio.to_thread(system.wait_ready)
    expected = await reference(system.ws_urls, streams, before + after)
    left_open = await asyncio.to_thread(system.wait_no_open_sessions)
    mismatched = 0
    for stream in streams:
        for chunk in stream.chunks:
            seq = chunk.header.seq
            if seq < len(expected[stream.index]):
                diff = float(np.abs(frames_of(chunk) - expected[stream.index][seq]).mean())
                mismatched += int(diff > FRAME_TOLERANCE)
    gaps_s = [
        (b.received_at_unix_ms - a.received_at_unix_ms) / 1e3
        for s in streams for a, b in zip(s.chunks, s.chunks[1:], strict=False)
        if b.received_at_unix_ms >= fault_ms
    ]
    stalls_s = [stall for stream in streams for stall in playback_stalls(stream, after_ms=fault_ms)]
    recovered_s = max(
        ((s.chunks[min(len(s.chunks) - 1, before + 1)].received_at_unix_ms - fault_ms) / 1e3 for s in streams),
        default=float("nan"),
    )
    entry = {
        "fault": fault.name, "sessions": sessions, "sessions_on_the_victim_worker": serving.count(busiest),
        "sessions_lost": sum(bool(s.lost_session) for s in streams),
        "chunks_lost": sum(s.lost for s in streams), "chunks_duplicated": sum(s.duplicated for s in streams),
        "chunks_reordered": sum(s.reordered for s in streams), "frames_differing": mismatched,
        "longest_gap_s": max(gaps_s, default=0.0), "longest_stall_s": max(stalls_s, default=0.0),
        "stalls": len(stalls_s), "recover_s": recovered_s,
        "reconnects": sum(s.reconnects for s in streams), "left_open_after_close": left_open,
        "why_lost": [s.lost_session for s in streams if s.lost_session],
    }
    return entry, streams, fault_ms


def plot(timelines: list[tuple[str, list[Stream], float]]) -> None:
    fig, axes = plt.subplots(len(timelines), 1, figsize=(9, 2.2 * len(timelines)), sharex=True)
    for ax, (name, streams, fault_ms) in zip(np.atleast_1d(axes), timelines, strict=True):
        for stream in streams:
            times = [(c.received_at_unix_ms - fault_ms) / 1e3 for c in stream.chunks]
            ax.plot(times[1:], np.diff(times), marker=".", linewidth=0.6, markersize=2)
        ax.axvline(0, color="red", linewidth=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("wait (s)")
    np.atleast_1d(axes)[-1].set_xlabel("seconds since the fault (red line); each line one client")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


async def run(args: argparse.Namespace) -> int:
    nats = start_nats_cluster(3)
    postgres = locate_postgres(allow_local=False)  # a server of our own, to crash and restart
    database_url, database = instance_database(postgres)
    system = ChaosSystem(database_url, nats, postgres)
    rows: list[dict[str, Any]] = []
    timelines: list[tuple[str, list[Stream], float]] = []
    faults = [f for f in FAULTS if not args.only or any(word in f.name for word in args.only)]
    if not postgres.owned:
        console.print(f"DATABASE_URL names a {postgres.source} PostgreSQL, not ours to restart: that fault is skipped")
        faults = [f for f in faults if f.inject is not restart_postgres]
    try:
        system.start()
        with Progress(console=console) as progress:
            task = progress.add_task("faults", total=len(faults))
            for index, fault in enumerate(faults):
                progress.update(task, description=fault.name)
                entry, streams, fault_ms = await one_fault(system, fault, args.sessions, args.before, args.after,
                                                           1000 * (index + 1))
                rows.append(entry)
                timelines.append((fault.name, streams, fault_ms))
                progress.advance(task)
    finally:
        system.stop(keep_logs=args.keep_logs or len(rows) < len(faults))
        for server in nats:
            server.stop()
        if database is not None:
            drop_database(postgres, database)
        postgres.stop()
    table = Table(title=f"{args.sessions} sessions streaming, one fault at a time (tiny model, this machine)")
    for column in ("fault", "sessions lost", "chunks lost", "duplicated", "reordered", "frames differing",
                   "longest gap (s)", "stalls", "longest stall (s)", "recovered (s)", "reconnects"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["fault"], str(r["sessions_lost"]), str(r["chunks_lost"]), str(r["chunks_duplicated"]),
                      str(r["chunks_reordered"]), str(r["frames_differing"]), f"{r['longest_gap_s']:.2f}",
                      str(r["stalls"]), f"{r['longest_stall_s']:.2f}", f"{r['recover_s']:.2f}", str(r["reconnects"]))
    console.print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "sessions": args.sessions, "chunks_before": args.before, "chunks_after": args.after, "faults": rows,
    }, indent=2) + "\n")
    plot(timelines)
    console.print(f"wrote {RESULTS} and {PLOT}")
    clean = all(r["sessions_lost"] == r["chunks_lost"] == r["chunks_duplicated"] == r["chunks_reordered"] == 0
                for r in rows)
    return 0 if clean else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--before", type=int, default=4, help="chunks per session before the fault")
    parser.add_argument("--after", type=int, default=12, help="chunks per session after it")
    parser.add_argument("--only", nargs="*", default=[], help="run only the faults whose name has one of these")
    parser.add_argument("--keep-logs", action="store_true", help="keep every service's log (kept anyway on a failure)")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
