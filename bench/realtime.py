"""Real-time capacity of one worker: how many sessions it holds while every stream plays without a stall.

Run: ``.venv/bin/python bench/realtime.py`` (3-6 minutes; nothing else should run meanwhile). Writes
``bench/results/realtime.json`` and ``bench/results/realtime.png`` (late fraction against sessions, both modes).

One worker's engine (the tiny model from a synthetic checkpoint, read by the real loader; JPEG encoding
included) serves ``n`` sessions whose clients play at 16 frames/s. Each client is paced exactly as the gateway
paces it (``services/gateway/playback.py``): at most ``lead`` chunks of video past the playhead, the chunk on
screen included; each chunk carries the deadline at which its first frame must play, and the engine's batches
serve the earliest deadline first, a batch that is not full waiting for the streams due to join it while its
deadline allows (``services/gpu_worker/batch_hold.py``). Sessions start spread over one chunk interval, as
arrivals are. A chunk is *late* when it arrives after the previous one finished playing: the picture froze (a
stall). The ramp raises ``n`` until more than
``--late-budget`` of the chunks are late; ``sessions_held`` is the last ``n`` within it. The same ramp runs with
``max_batch=1`` (one session per forward, the baseline) in the same process, levels interleaved.

Busy fraction: the time the engine spent in forward passes and encoding over the level's wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The repository root in place of bench/ (a script's own folder comes first): bench/kernels.py must not shadow
# the `kernels` package transformers probes for.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

from services.common.chunk_frame import read_header  # noqa: E402
from services.common.messages import AttachSession, DetachSession, RequestChunks  # noqa: E402
from services.gateway.playback import PlaybackClock  # noqa: E402
from services.gpu_worker.engine import ChunkEngine  # noqa: E402
from services.gpu_worker.frames import JpegEncoder  # noqa: E402
from services.gpu_worker.model import StreamingVideoModel, get_config, load_model  # noqa: E402
from services.gpu_worker.model.synth import temporary_synthetic_dir  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "realtime.json"
PLOT = Path(__file__).parent / "results" / "realtime.png"
RAMP = (2, 4, 6, 8, 12, 16, 20, 24, 28, 32, 36, 40, 48, 56, 64)
console = Console(width=140)


@dataclass
class Level:
    mode: str
    sessions: int
    chunks: int = 0
    late: int = 0
    stall_ms: list[float] = field(default_factory=list)
    busy_frac: float = 0.0
    wall_s: float = 0.0

    @property
    def late_frac(self) -> float:
        return self.late / self.chunks if self.chunks else 0.0

    def row(self) -> dict[str, Any]:
        stalls = sorted(self.stall_ms)
        return {
            **{k: v for k, v in asdict(self).items() if k != "stall_ms"}, "late_frac": self.late_frac,
            "stall_p50_ms": stalls[len(stalls) // 2] if stalls else 0.0,
            "stall_p99_ms": stalls[min(len(stalls) - 1, int(0.99 * len(stalls)))] if stalls else 0.0,
            "stall_max_ms": stalls[-1] if stalls else 0.0,
        }


class PacedClient:
    """One viewer: plays what arrives at ``fps`` and credits the engine as the gateway would."""

    def __init__(self, session_id: str, engine: ChunkEngine, fps: float, lead: int, total: int) -> None:
        self.session_id = session_id
        self.engine = engine
        self.playback = PlaybackClock(fps=fps, lead_chunks=lead)
        self.total = total
        self.granted = -1
        self.done = asyncio.Event()
        self.stall_ms: list[float] = []
        self.timer: asyncio.TimerHandle | None = None

    async def credit(self) -> None:
        now = time.time()
        up_to = min(self.playback.credit_up_to(now), self.total - 1)
        if self.timer is not None:
            self.timer.cancel()
        at = self.playback.next_credit_at(now)
        if at is not None and up_to < self.total - 1:
            self.timer = asyncio.get_running_loop().call_later(
                max(0.0, at - now) + 0.001, lambda: asyncio.ensure_future(self.credit()))
        if up_to <= self.granted:
            return
        self.granted = up_to
        await self.engine.credit(RequestChunks(
            self.session_id, 1, up_to, due_unix_ms=self.playback.deadline(up_to, now) * 1e3,
            interval_ms=self.playback.chunk_s * 1e3))

    async def arrived(self, seq: int, frames: int) -> None:
        before = self.playback.stalled_s
        self.playback.delivered(seq, frames, time.time())
        if self.playback.stalled_s > before:
            self.stall_ms.append((self.playback.stalled_s - before) * 1e3)
        if seq + 1 >= self.total:
            if self.timer is not None:
                self.timer.cancel()
            self.done.set()
            return
        await self.credit()


async def run_level(model: StreamingVideoModel, mode: str, sessions: int, args: argparse.Namespace) -> Level:
    config = get_config("tiny")
    clients: dict[str, PacedClient] = {}

    async def emit(session_id: str, payload: bytes) -> None:
        header, _ = read_header(payload)
        await clients[session_id].arrived(header.seq, len(header.frame_sizes))

    engine = ChunkEngine(model, JpegEncoder(90), emit, worker_id="bench", model_name="tiny",
                         frame_size=(config.width_px, config.height_px),
                         max_batch=sessions if mode == "batched" else 1, replay_depth=args.lead + 2)
    stop = asyncio.Event()
    loop_task = asyncio.create_task(engine.run(stop))
    interval_s = 12 / args.fps
    busy_ms = 0.0
    started = time.perf_counter()
    try:
        for index in range(sessions):
            sid = f"{mode}-{sessions}-{index}"
            clients[sid] = PacedClient(sid, engine, args.fps, args.lead, args.chunks)
            await engine.attach(AttachSession(sid, 1, index, "tiny", 0, ((0, f"prompt {index % 7}"),)))
            await clients[sid].credit()
            await asyncio.sleep(interval_s / sessions)  # arrivals spread over one chunk interval
        waiting = asyncio.gather(*(c.done.wait() for c in clients.values()))
        while not waiting.done():
            await asyncio.wait({waiting}, timeout=0.5)
            busy_ms += sum(ms for _, ms in engine.drain_batch_samples())  # (size, the batch's ms)
        busy_ms += sum(ms for _, ms in engine.drain_batch_samples())  # (size, the batch's ms)
    finally:
        stop.set()
        await loop_task
        for sid in clients:
            await engine.detach(DetachSession(sid, 1))
    wall_s = time.perf_counter() - started
    level = Level(mode, sessions, wall_s=wall_s, busy_frac=min(1.0, busy_ms / 1e3 / wall_s))
    for client in clients.values():
        level.chunks += client.total - 1  # the first chunk of a stream has nothing playing before it
        level.late += len(client.stall_ms)
        level.stall_ms += client.stall_ms
    return level


def held(levels: list[Level], mode: str, budget: float) -> Level | None:
    passing = [lv for lv in levels if lv.mode == mode and lv.late_frac <= budget]
    return max(passing, key=lambda lv: lv.sessions) if passing else None


def plot(levels: list[Level], budget: float) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, color in (("batched", "tab:blue"), ("one at a time", "tab:orange")):
        rows = sorted((lv for lv in levels if lv.mode == mode), key=lambda lv: lv.sessions)
        ax.plot([lv.sessions for lv in rows], [100 * lv.late_frac for lv in rows], "o-", color=color, label=mode)
    ax.axhline(100 * budget, color="red", linewidth=0.8, linestyle="--", label=f"budget {100 * budget:g}%")
    ax.set_xlabel("sessions on one worker (tiny model, 16 fps playback)")
    ax.set_ylabel("chunks late for playback (%)")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


async def run(args: argparse.Namespace) -> int:
    model = load_model(temporary_synthetic_dir("tiny"), "tiny", max_sessions=max(RAMP))
    await run_level(model, "batched", 2, argparse.Namespace(**{**vars(args), "chunks": 3}))  # warm-up
    levels: list[Level] = []
    failed: set[str] = set()
    with Progress(console=console) as progress:
        task = progress.add_task("ramp", total=len(RAMP) * 2)
        for sessions in RAMP:
            for mode in ("one at a time", "batched"):
                progress.advance(task)
                if mode in failed:
                    continue
                progress.update(task, description=f"{mode}: {sessions} sessions")
                level = await run_level(model, mode, sessions, args)
                levels.append(level)
                if level.late_frac > args.late_budget:
                    failed.add(mode)
            if len(failed) == 2:
                break
    table = Table(title=f"one worker, tiny model, {args.fps:g} fps playback, lead {args.lead} chunks, "
                        f"{args.chunks} chunks per session")
    for column in ("mode", "sessions", "chunks", "late", "late %", "stall p50 ms", "stall max ms", "busy %"):
        table.add_column(column, justify="right")
    for lv in levels:
        r = lv.row()
        table.add_row(lv.mode, str(lv.sessions), str(lv.chunks), str(lv.late), f"{100 * lv.late_frac:.2f}",
                      f"{r['stall_p50_ms']:.0f}", f"{r['stall_max_ms']:.0f}", f"{100 * lv.busy_frac:.0f}")
    console.print(table)
    batched = held(levels, "batched", args.late_budget)
    single = held(levels, "one at a time", args.late_budget)
    held_batched = batched.sessions if batched else 0
    held_single = single.sessions if single else 0
    ratio = held_batched / held_single if held_single else float("inf")
    console.print(f"sessions held within {100 * args.late_budget:g}% late: batched {held_batched}, "
                  f"one at a time {held_single} ({ratio:.2f}x)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": "tiny", "fps": args.fps, "lead_chunks": args.lead, "chunks_per_session": args.chunks,
        "late_budget": args.late_budget,
        "sessions_held": held_batched, "sessions_held_one_at_a_time": held_single,
        "held_ratio": ratio,
        "late_frac": batched.late_frac if batched else None,
        "busy_frac": batched.busy_frac if batched else None,
        "busy_frac_one_at_a_time": single.busy_frac if single else None,
        "stall_ms_median_over_levels": statistics.median([s for lv in levels for s in lv.stall_ms] or [0.0]),
        "levels": [lv.row() for lv in levels],
    }, indent=2) + "\n")
    plot(levels, args.late_budget)
    console.print(f"wrote {RESULTS} and {PLOT}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fps", type=float, default=16.0)
    parser.add_argument("--lead", type=int, default=2,
                        help="chunks of video past the playhead, the one on screen included (at least 2)")
    parser.add_argument("--chunks", type=int, default=20, help="chunks per session at each level")
    parser.add_argument("--late-budget", type=float, default=0.001, help="largest fraction of late chunks held")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
