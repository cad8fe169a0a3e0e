"""Property-based fuzzing of everything a client or a peer can send: the client's JSON and msgpack control
messages and the binary chunk frame. Over 10,000 generated inputs per run, every one either parses into a typed
message or is refused with a ProtocolError whose code docs/protocol.md documents; never another exception (which
the gateway would have to answer ``internal``)."""

from __future__ import annotations

import json
import struct
from typing import Any

import msgpack
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from services.common.chunk_frame import MAGIC, ChunkHeader, pack_chunk, read_header
from services.common.client_messages import parse_client_message
from services.common.errors import ProtocolError

PARSE_CODES = {"malformed", "unknown_type", "invalid_field", "unsupported_version", "message_too_large"}
"""The codes docs/protocol.md lists for a message refused before it reaches a session."""
TYPES = ["start", "prompt", "pause", "resume", "close", "played", "chunk", "placement", "open_session", "", "Start"]
FIELDS = ["type", "t", "v", "session_id", "prompt", "seed", "width", "height", "next_seq", "seq", "epoch", "extra"]
def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["\x00", "\ud800", "a red fox", " ", "9f1c", "x" * 2100]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4), max_leaves=12)
messages = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(TYPES)}, optional={f: values for f in FIELDS if f != "type"}),
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), values, max_size=6),
    values,
)


def refused_as_documented(data: str | bytes) -> None:
    try:
        parse_client_message(data)
    except ProtocolError as exc:
        assert exc.code in PARSE_CODES, f"undocumented code {exc.code!r} for {data!r:.200}"


@fuzz(4000)
@given(messages)
def test_any_json_text_frame_parses_or_is_refused_with_a_documented_code(obj: Any) -> None:
    refused_as_documented(json.dumps(obj, allow_nan=True))


@fuzz(1000)
@given(st.text(max_size=200))
def test_any_text_at_all_parses_or_is_refused_with_a_documented_code(text: str) -> None:
    refused_as_documented(text)


@fuzz(3000)
@given(messages)
def test_any_msgpack_binary_frame_parses_or_is_refused_with_a_documented_code(obj: Any) -> None:
    try:
        data = msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError, UnicodeEncodeError):
        assume(False)  # not representable in msgpack (an int over 64 bits, a lone surrogate): nobody can send it
    refused_as_documented(data)


@fuzz(1000)
@given(st.binary(max_size=300))
def test_any_bytes_at_all_parse_or_are_refused_with_a_documented_code(data: bytes) -> None:
    refused_as_documented(data)


VALID_FRAME = pack_chunk(
    ChunkHeader(session_id="9f1c", epoch=1, seq=3, first_frame=21, width=32, height=32, frame_sizes=(3, 2)),
    [b"abc", b"de"],
)


@fuzz(1500)
@given(st.binary(max_size=200), st.lists(st.tuples(st.integers(0, len(VALID_FRAME) - 1), st.integers(0, 255)),
                                         max_size=6), st.integers(0, len(VALID_FRAME)))
def test_any_chunk_frame_bytes_parse_or_are_refused_with_a_documented_code(
    noise: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    mutated = bytearray(VALID_FRAME)
    for index, value in flips:
        mutated[index] = value
    for data in (noise, bytes(mutated[:cut]), struct.pack(">4sI", MAGIC, len(noise)) + noise):
        try:
            read_header(data)
        except ProtocolError as exc:
            assert exc.code in PARSE_CODES, f"undocumented code {exc.code!r}"
