"""Wire codec on the chunk path's messages: ``common/wire.py`` (dataclass messages, decoded by msgspec from their
annotations) against the reflection decoder it replaced and against msgspec's own tagged ``Struct``s.

Run: ``.venv/bin/python bench/wire.py`` (seconds). Writes ``bench/results/wire.json``.

The former decoder (msgpack-python, then a walk over each field's type hints) is kept below as the baseline,
verbatim. The Struct side declares the same four messages with the same bounds (``Meta``) and the same ``t``/``v``
keys: it is the floor a full switch to Structs could reach. All three accept the same bytes (checked below).
Times are the median per message of 7 rounds of ``--count`` calls, rounds of the sides interleaved so all see the
same machine.
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

import dataclasses  # noqa: E402
import types  # noqa: E402
import typing  # noqa: E402
from collections.abc import Mapping  # noqa: E402

import msgpack  # noqa: E402
import msgspec  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from services.common.chunk_frame import ChunkHeader  # noqa: E402
from services.common.errors import InvalidField, UnsupportedVersion  # noqa: E402
from services.common.messages import AttachSession, RequestChunks, WorkerHeartbeat  # noqa: E402
from services.common.wire import _REGISTRY, Message, decode, encode  # noqa: E402

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




# --- the former decoder, the baseline ------------------------------------------------------------------------


def reflection_decode(data: bytes) -> Message:
    obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    return _validated(_REGISTRY[obj["t"]], obj, obj["t"])


PROTOCOL_VERSION = 1
_HINTS = {cls: typing.get_type_hints(cls) for cls in _REGISTRY.values()}  # the former code cached them too


def _validated(cls: type[Message], obj: Mapping[Any, Any], tag: str) -> Message:
    version = obj.get("v", PROTOCOL_VERSION)
    if type(version) is not int or version != PROTOCOL_VERSION:  # true and 1.0 == 1 in Python, not on the wire
        raise UnsupportedVersion(f"protocol version {version!r} is not supported (this peer speaks {PROTOCOL_VERSION})")
    hints: dict[str, Any] = _HINTS[cls]
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name in obj:
            kwargs[field.name] = _checked(obj[field.name], hints[field.name], field.name)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise InvalidField(f"{tag}: missing required field {field.name!r}")
    msg = cls(**kwargs)
    msg.check()
    return msg



def _checked(value: Any, annotation: Any, name: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _checked(value, option, name)
            except InvalidField:
                continue
        raise InvalidField(f"field {name!r} has the wrong type {type(value).__name__}")
    if annotation is type(None):
        if value is None:
            return None
        raise InvalidField(f"field {name!r} must be null")
    if origin is typing.Literal:
        if value in typing.get_args(annotation):
            return value
        raise InvalidField(f"field {name!r} must be one of {typing.get_args(annotation)}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise InvalidField(f"field {name!r} must be a list")
        args = typing.get_args(annotation)
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            return tuple(_checked(item, args[0], name) for item in value)
        if len(value) != len(args):
            raise InvalidField(f"field {name!r} must have {len(args)} items, got {len(value)}")
        return tuple(_checked(item, item_type, name) for item, item_type in zip(value, args, strict=True))
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        if not isinstance(value, Mapping):
            raise InvalidField(f"field {name!r} must be a map")
        return {_checked(k, key_type, name): _checked(v, value_type, name) for k, v in value.items()}
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, bool):
        raise InvalidField(f"field {name!r} must be an integer, got a boolean")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise InvalidField(f"field {name!r} must be {annotation.__name__}, got {type(value).__name__}")
    if isinstance(value, str) and not value.isascii():  # the chunk path's ids are ASCII: one C scan, no copy
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # JSON's "\ud800" decodes to a lone surrogate no UTF-8 peer can take
            raise InvalidField(f"field {name!r} is not valid Unicode (a lone surrogate)") from None
    return value


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
        assert reflection_decode(data) == msg, f"{name}: the former decoder reads these bytes differently"
        sides = {
            "ours_encode": lambda msg=msg: encode(msg),
            "structs_encode": lambda s=struct: ENCODER.encode(s),
            "former_decode": lambda d=data: reflection_decode(d),
            "ours_decode": lambda d=data: decode(d),
            "structs_decode": lambda d=data: DECODER.decode(d),
        }
        timings: dict[str, list[float]] = {k: [] for k in sides}
        for _ in range(args.rounds):
            for key, action in sides.items():
                timings[key].append(per_call_us(action, args.count))
        row = {"message": name, "bytes": len(data), **{k: statistics.median(v) for k, v in timings.items()}}
        rows.append(row)
    table = Table(title=f"wire codec per message, median of {args.rounds} rounds of {args.count} (us)")
    for column in ("message", "bytes", "encode", "Structs encode", "former decode", "decode", "Structs decode",
                   "decode vs former"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["message"], str(r["bytes"]), f"{r['ours_encode']:.2f}", f"{r['structs_encode']:.2f}",
                      f"{r['former_decode']:.2f}", f"{r['ours_decode']:.2f}", f"{r['structs_decode']:.2f}",
                      f"{r['former_decode'] / r['ours_decode']:.1f}x faster")
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
