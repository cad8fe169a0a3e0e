"""The exception tree every service shares: recoverable errors carry a stable code a client can act on.

ProtocolError and its children are the peer's fault and recoverable (the connection stays usable); everything
else deriving from TurboServeError is ours. Codes are part of the public protocol (docs/protocol.md).
"""

from __future__ import annotations


class TurboServeError(Exception):
    """Base of every error TurboServe raises on purpose."""

    code = "internal"


class ProtocolError(TurboServeError):
    """The peer sent something we refuse; answer with an error message and keep the connection."""

    code = "bad_request"
    request_type: str | None = None
    """The refused message's type when it could be read, so the answer can name the request it refuses."""


class MessageTooLarge(ProtocolError):
    code = "message_too_large"


class MalformedMessage(ProtocolError):
    code = "malformed"


class UnknownMessageType(ProtocolError):
    code = "unknown_type"


class InvalidField(ProtocolError):
    code = "invalid_field"


class UnsupportedVersion(ProtocolError):
    code = "unsupported_version"


class UnknownSession(ProtocolError):
    """The session does not exist for this caller (also what another token's session looks like)."""

    code = "unknown_session"


class LimitExceeded(ProtocolError):
    """A per-token or per-server limit; retrying later may succeed."""

    code = "limit_exceeded"


class InvalidState(ProtocolError):
    """The request does not fit the session's state (e.g. resume of an active session)."""

    code = "invalid_state"


class Unavailable(TurboServeError):
    """No capacity or a dependency is down right now; retry later (maps to WebSocket close 1013 / HTTP 503)."""

    code = "unavailable"


class StaleEpoch(TurboServeError):
    """A fenced write or chunk from an owner that no longer owns the session (after a migration)."""

    code = "stale_epoch"


CLIENT_CODES = frozenset({
    "malformed", "unknown_type", "invalid_field", "unsupported_version", "message_too_large", "unknown_session",
    "invalid_state", "limit_exceeded", "unavailable", "slow_consumer", "internal",
})
"""The error codes a client may see, as docs/protocol.md lists them (a test holds the two together)."""


def client_code(code: str) -> str:
    """What a client is told for an error with ``code``, which may be a peer's: a race with a move or a takeover
    (``stale_epoch``) is worth a retry; a code no client can act on is our bug."""
    if code in CLIENT_CODES:
        return code
    return "unavailable" if code == StaleEpoch.code else "internal"
