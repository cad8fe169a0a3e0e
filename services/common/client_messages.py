"""Messages between a client and the gateway over WebSocket (text frames: JSON; binary frames: msgpack).

Both encodings carry the same map: ``{"type": ..., fields...}``. Chunks go to the client as binary chunk frames
(``chunk_frame``), everything else as JSON text. The full protocol is in docs/protocol.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from services.common.errors import InvalidField, MalformedMessage, MessageTooLarge, UnknownMessageType
from services.common.messages import _check_prompt
from services.common.wire import Message, decode, from_mapping, message

MAX_CLIENT_MESSAGE_BYTES = 8 * 1024
MAX_SEED = 2**63 - 1


@message
@dataclass(frozen=True, slots=True)
class Start(Message):
    """Open a session. ``width``/``height`` are optional and must match the served model's size."""

    TYPE = "start"
    prompt: str
    seed: int = 0
    width: int | None = None
    height: int | None = None

    def check(self) -> None:
        _check_prompt(self.prompt)
        if not 0 <= self.seed <= MAX_SEED:
            raise InvalidField(f"seed must be in [0, 2**63), got {self.seed}")


@message
@dataclass(frozen=True, slots=True)
class SetPrompt(Message):
    TYPE = "prompt"
    session_id: str
    prompt: str

    def check(self) -> None:
        _check_prompt(self.prompt)


@message
@dataclass(frozen=True, slots=True)
class Pause(Message):
    TYPE = "pause"
    session_id: str


@message
@dataclass(frozen=True, slots=True)
class Resume(Message):
    TYPE = "resume"
    session_id: str
    next_seq: int | None = None
    """The seq the client needs next (one past the last it holds); given, a gateway that takes the session over
    continues exactly there. Omitted: where the session's last gateway recorded its client to be."""

    def check(self) -> None:
        if self.next_seq is not None and self.next_seq < 0:
            raise InvalidField("next_seq must not be negative")


@message
@dataclass(frozen=True, slots=True)
class Close(Message):
    TYPE = "close"
    session_id: str


@message
@dataclass(frozen=True, slots=True)
class Played(Message):
    """Chunk ``seq`` started playing just now. Optional: without it the gateway assumes a player that starts each
    chunk when the previous ends; with it (a buffering or throttled player) generation follows the real one."""

    TYPE = "played"
    session_id: str
    seq: int

    def check(self) -> None:
        if self.seq < 0:
            raise InvalidField("seq must not be negative")


@message
@dataclass(frozen=True, slots=True)
class ListOwnSessions(Message):
    """Which sessions this token holds open (a reloaded page, a crashed program): answered with ``sessions``."""

    TYPE = "list"


ClientMessage = Start | SetPrompt | Pause | Resume | Close | Played | ListOwnSessions
_CLIENT_TYPES = (Start, SetPrompt, Pause, Resume, Close, Played, ListOwnSessions)


def parse_client_message(data: str | bytes) -> ClientMessage:
    """Decode a client frame (JSON text or msgpack binary) into a typed message, or raise a ProtocolError."""
    size = len(data.encode() if isinstance(data, str) else data)
    if size > MAX_CLIENT_MESSAGE_BYTES:
        raise MessageTooLarge(f"message of {size} bytes exceeds the limit of {MAX_CLIENT_MESSAGE_BYTES} bytes")
    if isinstance(data, str):
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise MalformedMessage(f"not valid JSON: {exc}") from None
        except RecursionError:  # a few KiB of nested brackets is enough to reach Python's recursion limit
            raise MalformedMessage("not valid JSON: nested too deeply") from None
        msg = from_mapping(obj)
    else:
        msg = decode(data, max_bytes=MAX_CLIENT_MESSAGE_BYTES)
    if not isinstance(msg, _CLIENT_TYPES):
        raise UnknownMessageType(f"{msg.TYPE!r} is not a client message")
    return msg


def server_message(kind: str, **fields: object) -> str:
    """A server -> client text message (started, error, state, closed)."""
    return json.dumps({"type": kind, **fields}, separators=(",", ":"))
