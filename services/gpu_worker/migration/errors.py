"""Errors of a live migration; every one of them ends the migration with the session still owned by the source.

TransferFailed and FrameTooLarge come from the link (peer gone, timeout, garbage); MigrationAborted is what the
state machine raises once it has rolled back (PeerAborted when the peer asked); IllegalTransition is a bug in
the caller's sequencing.
"""

from __future__ import annotations

from services.common.errors import TurboServeError


class MigrationError(TurboServeError):
    """Base of the migration errors."""

    code = "migration_failed"


class TransferFailed(MigrationError):
    """The peer vanished, timed out, or sent something undecodable; the link is unusable."""

    code = "transfer_failed"


class FrameTooLarge(TransferFailed):
    """A frame header or payload over its limit: refuse before allocating anything."""

    code = "frame_too_large"


class MigrationProtocolError(TransferFailed):
    """A well-formed frame that does not fit this migration (wrong kind, id, or shapes)."""

    code = "migration_protocol"


class MigrationAborted(MigrationError):
    """The migration was aborted (by a peer, a timeout or a request) and its rollback has run."""

    code = "migration_aborted"


class PeerAborted(MigrationAborted):
    """The peer sent ABORT; it already knows, so nobody tells it back."""

    code = "migration_peer_aborted"


class IllegalTransition(MigrationError):
    """A phase change the state machine does not allow: a sequencing bug in the caller."""

    code = "illegal_transition"
