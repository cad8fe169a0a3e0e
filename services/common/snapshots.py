"""Subjects and messages of the state_store: only small metadata crosses these subjects, never snapshot bytes.

A snapshot's bytes go straight from the writer to the storage medium (the JetStream object store, or a shared
directory) under a fresh ``snapshot_id``; the service then commits a ``SnapshotHead`` that names them. Readers ask
the service for the head and read the bytes from the medium themselves. Commits are fenced by
``(epoch, chunk_seq)``: a head only replaces one that is strictly older, so a stale owner cannot roll a session's
state back (STYLE habit 4).

Requests and their answers (every request may also be answered by a ``Reply`` with ok=False and an error code):

- ``STATE_DESCRIBE``: ``DescribeStore`` -> ``StoreLocation`` (where to write and read the bytes).
- ``STATE_COMMIT``: ``SnapshotHead`` -> ``Reply`` (ok, or ``stale_snapshot`` / ``session_closed`` / ...).
- ``STATE_GET``: ``SnapshotQuery`` -> ``SnapshotHead``, or ``Reply`` with code ``unknown_session`` when none.
- ``STATE_DELETE`` and ``STATE_CLOSE``: ``SnapshotQuery`` -> ``Reply``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from services.common.errors import InvalidField
from services.common.subjects import PREFIX
from services.common.wire import Message, message

STATE_DESCRIBE = f"{PREFIX}.state.describe"
STATE_COMMIT = f"{PREFIX}.state.commit"
STATE_GET = f"{PREFIX}.state.get"
STATE_DELETE = f"{PREFIX}.state.delete"
STATE_CLOSE = f"{PREFIX}.state.close"

MAX_HEAD_BYTES = 512 * 1024
"""A head (mostly its manifest) must fit one NATS message with room to spare (the default max_payload is 1 MiB)."""
MAX_BUFFERS = 1024
_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def is_valid_id(value: str) -> bool:
    """Ids become object names, KV keys, subject tokens and file names: letters, digits, '-' and '_', at most 128."""
    return _ID.match(value) is not None


def check_id(name: str, value: str) -> str:
    if not is_valid_id(value):
        raise InvalidField(f"{name} {value!r} must be 1-128 characters of [A-Za-z0-9_-]")
    return value


@message
@dataclass(frozen=True, slots=True)
class SnapshotHead(Message):
    """The committed description of a session's latest snapshot: what to read, and which state it is.

    ``chunk_seq`` is the last chunk generated before the snapshot was taken; ``created_at`` is wall-clock seconds
    since the Unix epoch; ``buffer_bytes`` are the lengths of the buffers, stored back to back; ``digest`` is
    ``sha256:<hex>`` of those bytes; ``manifest`` is the writer's plain-data description of its tensor views.
    """

    TYPE = "snapshot_head"
    session_id: str
    snapshot_id: str
    epoch: int
    chunk_seq: int
    created_at: float
    buffer_bytes: tuple[int, ...]
    digest: str
    manifest: dict[str, object] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.buffer_bytes)

    def check(self) -> None:
        check_id("session_id", self.session_id)
        check_id("snapshot_id", self.snapshot_id)
        if self.epoch < 1 or self.chunk_seq < 0:
            raise InvalidField(f"epoch={self.epoch} must be >= 1 and chunk_seq={self.chunk_seq} >= 0")
        if len(self.buffer_bytes) > MAX_BUFFERS or any(size < 0 for size in self.buffer_bytes):
            raise InvalidField(f"{len(self.buffer_bytes)} buffers (at most {MAX_BUFFERS}), sizes must be >= 0")
        if not self.digest.startswith("sha256:"):
            raise InvalidField(f"digest {self.digest!r:.80} must be 'sha256:<hex>'")


@message
@dataclass(frozen=True, slots=True)
class SnapshotQuery(Message):
    """Names the session a get, delete or close is about."""

    TYPE = "snapshot_query"
    session_id: str

    def check(self) -> None:
        check_id("session_id", self.session_id)


@message
@dataclass(frozen=True, slots=True)
class DescribeStore(Message):
    """Asks the service where snapshot bytes live."""

    TYPE = "describe_store"


@message
@dataclass(frozen=True, slots=True)
class StoreLocation(Message):
    """Where writers put and readers fetch snapshot bytes: a JetStream bucket, or a directory shared with the
    service (same host or a shared volume)."""

    TYPE = "store_location"
    backend: Literal["jetstream", "directory"]
    name: str
