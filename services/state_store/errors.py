"""What can go wrong with a snapshot, split into the caller's fault, a race worth retrying, and damage.

Every error carries a stable ``code`` that crosses the wire in a ``Reply``; ``error_for_code`` turns it back into
the same class on the client, so a worker handles a remote failure exactly like a local one.
"""

from __future__ import annotations

from services.common.errors import (
    InvalidField,
    InvalidState,
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    StaleEpoch,
    TurboServeError,
    Unavailable,
    UnknownMessageType,
    UnknownSession,
    UnsupportedVersion,
)


class StateStoreError(TurboServeError):
    """Base of the state_store's own errors."""

    code = "state_store_error"


class StaleSnapshot(StaleEpoch):
    """The commit is not newer, by (epoch, chunk_seq), than the session's committed snapshot; it is refused."""

    code = "stale_snapshot"


class SessionClosed(InvalidState):
    """The session was closed; its snapshots only wait to expire and no new one is accepted."""

    code = "session_closed"


class SnapshotIncomplete(ProtocolError):
    """A commit names bytes that are missing, not the announced size (staging failed or was swept), or staged so
    long before the commit that a sweep may be removing them."""

    code = "snapshot_incomplete"


class SnapshotGone(StateStoreError):
    """The bytes of a head vanished while being read: a newer snapshot superseded it. Re-read the head."""

    code = "snapshot_gone"


class SnapshotCorrupt(StateStoreError):
    """Stored bytes do not match their digest or size; fatal for that snapshot."""

    code = "snapshot_corrupt"


class CommitConflict(Unavailable):
    """Another commit of the same session won a race; retrying re-evaluates the fence."""

    code = "commit_conflict"


_BY_CODE: dict[str, type[TurboServeError]] = {
    cls.code: cls
    for cls in (
        StaleSnapshot,
        SessionClosed,
        SnapshotIncomplete,
        SnapshotGone,
        SnapshotCorrupt,
        CommitConflict,
        InvalidField,
        InvalidState,
        MalformedMessage,
        MessageTooLarge,
        UnknownMessageType,
        UnknownSession,
        UnsupportedVersion,
        ProtocolError,
        StaleEpoch,
        Unavailable,
    )
}


def error_for_code(code: str, detail: str) -> TurboServeError:
    """The exception a remote ``Reply(ok=False, code, detail)`` stands for (StateStoreError when unknown)."""
    cls = _BY_CODE.get(code, StateStoreError)
    return cls(detail if cls is not StateStoreError else f"{code}: {detail}")
