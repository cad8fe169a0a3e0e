"""Who owns which session and which connection drives it: the isolation between tokens on this gateway.

Invariants: a session belongs to exactly one owner (token) for its whole life; a client can only ever reach its
own owner's sessions (another owner's session looks exactly like one that does not exist); a session is driven by
at most one connection at a time, and one whose connection dropped is *lingering* until a connection of the same
owner adopts it. The per-token limit is not here: it spans gateways, so the scheduler enforces it. Pure
bookkeeping: no I/O, no timers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from services.common.errors import InvalidState, UnknownSession

S = TypeVar("S")


@dataclass(slots=True)
class _Entry(Generic[S]):
    owner: str
    session: S
    connection_id: int | None


class SessionRegistry(Generic[S]):
    """Sessions by id, with their owner and the connection (if any) that drives them."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry[S]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._entries

    def admit(self, owner: str, session_id: str, session: S, connection_id: int | None) -> None:
        """Register a session bound to ``connection_id`` (None: lingering, to be adopted)."""
        if session_id in self._entries:
            raise ValueError(f"session {session_id} is already registered")
        self._entries[session_id] = _Entry(owner, session, connection_id)

    def get(self, owner: str, session_id: str, connection_id: int) -> S:
        """The session if this connection drives it; a detached one must be adopted (resumed) first."""
        entry = self._owned(owner, session_id)
        if entry.connection_id != connection_id:
            raise InvalidState(self._not_driven_here(session_id, entry))
        return entry.session

    def adopt(self, owner: str, session_id: str, connection_id: int) -> S:
        """Bind a lingering session to this connection (resume after a reconnect); idempotent for the driver."""
        entry = self._owned(owner, session_id)
        if entry.connection_id not in (None, connection_id):
            raise InvalidState(self._not_driven_here(session_id, entry))
        entry.connection_id = connection_id
        return entry.session

    def is_detached(self, session_id: str) -> bool:
        entry = self._entries.get(session_id)
        return entry is not None and entry.connection_id is None

    def detach_connection(self, connection_id: int) -> list[tuple[str, S]]:
        """Unbind every session of a closed connection; they linger, still owned. Returns (session_id, session)."""
        detached = []
        for session_id, entry in self._entries.items():
            if entry.connection_id == connection_id:
                entry.connection_id = None
                detached.append((session_id, entry.session))
        return detached

    def remove(self, session_id: str, session: S | None = None) -> None:
        """Forget a closed session (only if it is still ``session``, when given); removing twice is harmless."""
        entry = self._entries.get(session_id)
        if entry is not None and (session is None or entry.session is session):
            del self._entries[session_id]

    def sessions(self) -> list[S]:
        return [entry.session for entry in self._entries.values()]

    def _owned(self, owner: str, session_id: str) -> _Entry[S]:
        entry = self._entries.get(session_id)
        if entry is None or entry.owner != owner:
            raise UnknownSession(f"no session {session_id!r} for this token")
        return entry

    @staticmethod
    def _not_driven_here(session_id: str, entry: _Entry[S]) -> str:
        if entry.connection_id is None:
            return f"session {session_id!r} lost its connection; send resume to take it over"
        return f"session {session_id!r} is driven by another connection of this token"
