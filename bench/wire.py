"""Wire codec: today's reflection-based ``common/wire.py`` against ``msgspec`` on the chunk path's messages.

Run: ``.venv/bin/python bench/wire.py`` (seconds). Writes ``bench/results/wire.json``.

The msgspec side declares the same four messages as tagged ``Struct``s with the same bounds (``Meta``) and the
same ``t``/``v`` keys, so both sides produce and accept the same bytes and do the same validation: the bytes one
side encodes are decoded by the other in the check below. Times are the median per message of 7 rounds of
``--count`` calls, rounds of the two sides interleaved so both see the same machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

# The repository root in place of bench/ (a script's own folder comes first): bench/kernels.py must not shadow
# the `kernels` package transformers probes for.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import msgspec  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from services.common.chunk_frame import ChunkHeader  # noqa: E402
from services.common.messages import AttachSession, RequestChunks, WorkerHeartbeat  # noqa: E402
from services.common.wire import Message, decode, encode  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "wire.json"
NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class _Tagged(msgspec.Struct, frozen=True, tag_field="t", kw_only=True):
    v: Literal[1] = 1


class RequestChunksS(_Tagged, tag="request_chunks"):
    session_id: str
    epoch: int
    up_to_seq: int
    resend_from_seq: int | None = None


class ChunkHeaderS(_Tagged, tag="chunk"):
    session_id: str
    epoch: int
    seq: NonNegative
    first_frame: int
    width: int
    height: int
    frame_sizes: tuple[Annotated[int, msgspec.Meta(gt=0)], ...]
    format: Literal["jpeg"] = "jpeg"
    timings_ms: dict[str, float] = {}
    worker_id: str = ""


class AttachSessionS(_Tagged, tag="attach_session"):
    session_id: str
    epoch: Annotated[int, msgspec.Meta(ge=1)]
    seed: int
    model: str
    next_seq: NonNegative
    prompts: tuple[tuple[int, Annotated[str, msgspec.Meta(min_length=1, max_length=2000)]], ...]

    def __post_init__(self) -> None:
        if not self.prompts or self.prompts[0][0] != 0:
            raise ValueError("prompt history must start at chunk 0")


class WorkerHeartbeatS(_Tagged, tag="worker_heartbeat"):
    worker_id: str
    kind: str
    model: str
    capacity: Annotated[int, msgspec.Meta(ge=1)]
    sessions: dict[str, int] = {}
    active_sessions: int = 0
    recent_batches: tuple[tuple[int, float], ...] = ()
    recent_restores: tuple[tuple[int, float], ...] = ()
    started_at_s: float = 0.0
    draining: bool = False
    offloaded: tuple[str, ...] = ()
    state_bytes: dict[str, int] = {}


Union = RequestChunksS | ChunkHeaderS | AttachSessionS | WorkerHeartbeatS
ENCODER = msgspec.msgpack.Encoder()
DECODER = msgspec.msgpack.Decoder(Union)


def samples() -> list[tuple[str, Message, type[msgspec.Struct]]]:
    sessions = {f"session-{i:04d}": 100 + i for i in range(8)}
    return [
        ("request_chunks (credit, every chunk)", RequestChunks("3f2a9c0d1e", 2, 41, None), RequestChunksS),
        ("chunk header (every chunk)", ChunkHeader(
            session_id="3f2a9c0d1e", epoch=2, seq=40, first_frame=477, width=832, height=480,
            frame_sizes=tuple(31_000 + i for i in range(12)), worker_id="worker-a",
            timings_ms={"queue_ms": 1.2, "model_ms": 812.4, "encode_ms": 3.1, "batch": 8.0,
                        "ready_at_unix_ms": 1.76e12, "sent_at_unix_ms": 1.76e12}), ChunkHeaderS),
        ("attach_session (control)", AttachSession("3f2a9c0d1e", 2, 7, "longlive", 40,
                                                   ((0, "a red fox in the snow"), (12, "the fox runs"))),
         AttachSessionS),
        ("worker heartbeat (1 s)", WorkerHeartbeat(
            worker_id="worker-a", kind="h100", model="longlive", capacity=8, sessions=sessions, active_sessions=6,
            recent_batches=tuple((8, 810.0 + i) for i in range(16)), started_at_s=1.76e9,
            state_bytes={k: 4_000_000_000 for k in sessions}), WorkerHeartbeatS),
    ]


def per_call_us(action: Callable[[], object], count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        action()
    return (time.perf_counter() - started) / count * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    console = Console(width=140)
    rows: list[dict[str, Any]] = []
    for name, msg, struct_type in samples():
        data = encode(msg)
        struct = DECODER.decode(data)
        assert isinstance(struct, struct_type)
        assert decode(ENCODER.encode(struct)) == msg, f"{name}: msgspec's bytes do not decode to the same message"
        timings: dict[str, list[float]] = {k: [] for k in ("ours_encode", "ours_decode", "ms_encode", "ms_decode")}
        for _ in range(args.rounds):
            timings["ours_encode"].append(per_call_us(lambda msg=msg: encode(msg), args.count))
            timings["ms_encode"].append(per_call_us(lambda s=struct: ENCODER.encode(s), args.count))
            timings["ours_decode"].append(per_call_us(lambda d=data: decode(d), args.count))
            timings["ms_decode"].append(per_call_us(lambda d=data: DECODER.decode(d), args.count))
        row = {"message": name, "bytes": len(data), **{k: statistics.median(v) for k, v in timings.items()}}
        rows.append(row)
    table = Table(title=f"wire codec per message, median of {args.rounds} rounds of {args.count} (us)")
    for column in ("message", "bytes", "ours encode", "msgspec encode", "ours decode", "msgspec decode",
                   "decode speedup"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["message"], str(r["bytes"]), f"{r['ours_encode']:.2f}", f"{r['ms_encode']:.2f}",
                      f"{r['ours_decode']:.2f}", f"{r['ms_decode']:.2f}", f"{r['ours_decode'] / r['ms_decode']:.1f}x")
    console.print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "msgspec": msgspec.__version__, "count": args.count, "rounds": args.rounds, "messages": rows,
    }, indent=2) + "\n")
    console.print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
