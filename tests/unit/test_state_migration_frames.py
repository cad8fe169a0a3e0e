"""The typed frames of the migration protocol."""

from __future__ import annotations

import msgpack
import pytest
import torch

from services.gpu_worker.migration.errors import MigrationProtocolError
from services.gpu_worker.migration.frames import (
    AbortFrame,
    AckFrame,
    BulkFrame,
    CommitFrame,
    FinalFrame,
    Frame,
    decode,
    encode,
)
from services.gpu_worker.state.packing import plan_manifest

MANIFEST = plan_manifest({"kv": torch.zeros(2, 2, 3, 1, 4), "cursor": torch.zeros(2, dtype=torch.int64)})


@pytest.mark.parametrize(
    "frame",
    [BulkFrame(MANIFEST, 7), FinalFrame(7, 9, 12, 40, MANIFEST), AckFrame(True, ""), CommitFrame(), AbortFrame("x")],
)
def test_every_frame_kind_survives_msgpack_unchanged(frame: Frame) -> None:
    wire = msgpack.unpackb(msgpack.packb(encode("m1", frame)))
    assert decode("m1", wire) == frame


def test_a_frame_of_another_migration_is_refused() -> None:
    with pytest.raises(MigrationProtocolError, match="m2"):
        decode("m1", encode("m2", CommitFrame()))


@pytest.mark.parametrize(
    "header",
    [
        {"v": 2, "migration_id": "m1", "kind": "commit"},
        {"v": 1, "migration_id": "m1", "kind": "teleport"},
        {"v": 1, "migration_id": "m1", "kind": "bulk", "chunks_done": 3},
        {"v": 1, "migration_id": "m1", "kind": "bulk", "chunks_done": "3", "manifest": MANIFEST.to_wire()},
        {"v": 1, "migration_id": "m1", "kind": "final", "first_chunk": 0, "last_chunk": 1, "rows": 2, "kv_rows": 4,
         "manifest": {"buffers": [], "views": [["x", "bfloat16", [2], 0, 0]]}},
    ],
)
def test_malformed_headers_are_protocol_errors(header: dict[str, object]) -> None:
    with pytest.raises(MigrationProtocolError):
        decode("m1", header)
