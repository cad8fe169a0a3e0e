"""docs/protocol.md against the code that speaks it: every client message with exactly its fields, every chunk
header key, every error code a client may get. The walk against a running gateway is tests/e2e/test_protocol_walk.py."""

from __future__ import annotations

import dataclasses

from services.common.chunk_frame import ChunkHeader
from services.common.client_messages import _CLIENT_TYPES
from services.common.errors import CLIENT_CODES
from tests.protocol_doc import ProtocolDoc

DOC = ProtocolDoc.read()


def test_the_documented_client_messages_are_the_ones_the_gateway_parses_with_the_same_fields() -> None:
    parsed = {cls.TYPE: [f.name for f in dataclasses.fields(cls)] for cls in _CLIENT_TYPES}
    assert {kind: row.fields for kind, row in DOC.client.items()} == parsed


def test_every_documented_answer_is_a_documented_server_message() -> None:
    answers = {row.answer for row in DOC.client.values()} - {None}
    assert answers <= set(DOC.server), answers - set(DOC.server)
    assert "error" in DOC.server


def test_the_documented_chunk_header_is_the_one_workers_write() -> None:
    assert DOC.header_keys == ["t", "v", *(f.name for f in dataclasses.fields(ChunkHeader))]


def test_the_documented_error_codes_are_the_ones_a_client_can_get() -> None:
    assert sorted(DOC.error_codes) == sorted(CLIENT_CODES)
