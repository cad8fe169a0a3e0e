"""The typed frames of the migration protocol on a PeerLink: one dataclass per kind, checked on decode.

Order on the link: source BULK, source FINAL, target ACK, source COMMIT; either side may send ABORT instead of
its next frame. Tensors travel beside the header (see transport), described by the manifests named here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.gpu_worker.migration.errors import MigrationProtocolError
from services.gpu_worker.state.errors import ManifestError
from services.gpu_worker.state.packing import StateManifest

PROTOCOL_VERSION = 1


@dataclass(frozen=True, slots=True)
class BulkFrame:
    """The whole state as of ``chunks_done`` chunks; tensors: the manifest's buffers."""

    manifest: StateManifest
    chunks_done: int


@dataclass(frozen=True, slots=True)
class FinalFrame:
    """At the boundary: KV rows written by chunks first_chunk..last_chunk plus the re-sent small tensors.

    ``kv_rows`` is the kv tensor's row count now: it exceeds the bulk's while the cache is still filling, and the
    new rows are among the written ones. Tensors: [row index int64 [rows], kv rows [layers, 2, rows, heads,
    head_dim]] when rows > 0, then the buffers of ``manifest`` (the re-sent tensors).
    """

    first_chunk: int
    last_chunk: int
    rows: int
    kv_rows: int
    manifest: StateManifest


@dataclass(frozen=True, slots=True)
class AckFrame:
    """The target imported the state (ok) or could not (reason)."""

    ok: bool
    reason: str


@dataclass(frozen=True, slots=True)
class CommitFrame:
    """Ownership moved (the source's epoch bump landed): the target may serve the session."""


@dataclass(frozen=True, slots=True)
class AbortFrame:
    """The sender gave up; the receiver rolls back."""

    reason: str


Frame = BulkFrame | FinalFrame | AckFrame | CommitFrame | AbortFrame


def encode(migration_id: str, frame: Frame) -> dict[str, Any]:
    """The header dict for ``PeerLink.send_frame``."""
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "migration_id": migration_id}
    match frame:
        case BulkFrame(manifest, chunks_done):
            header.update(kind="bulk", manifest=manifest.to_wire(), chunks_done=chunks_done)
        case FinalFrame(first_chunk, last_chunk, rows, kv_rows, manifest):
            header.update(kind="final", first_chunk=first_chunk, last_chunk=last_chunk, rows=rows, kv_rows=kv_rows,
                          manifest=manifest.to_wire())
        case AckFrame(ok, reason):
            header.update(kind="ack", ok=ok, reason=reason)
        case CommitFrame():
            header.update(kind="commit")
        case AbortFrame(reason):
            header.update(kind="abort", reason=reason)
    return header


def decode(migration_id: str, header: Mapping[str, Any]) -> Frame:
    """Check version and migration id, then build the typed frame; raises MigrationProtocolError."""
    if header.get("v") != PROTOCOL_VERSION:
        raise MigrationProtocolError(f"frame version {header.get('v')!r}, expected {PROTOCOL_VERSION}")
    if header.get("migration_id") != migration_id:
        raise MigrationProtocolError(f"frame for migration {header.get('migration_id')!r}, expected {migration_id}")
    kind = header.get("kind")
    try:
        match kind:
            case "bulk":
                return BulkFrame(StateManifest.from_wire(header["manifest"]), _int(header, "chunks_done"))
            case "final":
                return FinalFrame(_int(header, "first_chunk"), _int(header, "last_chunk"), _int(header, "rows"),
                                  _int(header, "kv_rows"), StateManifest.from_wire(header["manifest"]))
            case "ack":
                return AckFrame(bool(header["ok"]), str(header["reason"]))
            case "commit":
                return CommitFrame()
            case "abort":
                return AbortFrame(str(header["reason"]))
    except (KeyError, ManifestError) as exc:
        raise MigrationProtocolError(f"malformed {kind} frame: {exc}") from exc
    raise MigrationProtocolError(f"unknown frame kind {kind!r}")


def _int(header: Mapping[str, Any], key: str) -> int:
    value = header[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < -1:
        raise MigrationProtocolError(f"frame field {key} must be an integer >= -1, got {value!r}")
    return value
