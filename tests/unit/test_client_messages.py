"""Inputs a fuzzer found answered `internal`: each is now a documented, typed refusal."""

from __future__ import annotations

import json

import pytest

from services.common.client_messages import parse_client_message
from services.common.errors import InvalidField, MalformedMessage, UnsupportedVersion


def test_a_prompt_with_a_nul_character_is_an_invalid_field() -> None:
    with pytest.raises(InvalidField, match="NUL"):
        parse_client_message(json.dumps({"type": "start", "prompt": "a fox\u0000"}))


def test_a_lone_surrogate_in_any_string_is_an_invalid_field() -> None:
    with pytest.raises(InvalidField, match="lone surrogate"):
        parse_client_message('{"type": "start", "prompt": "a fox \\ud800"}')
    with pytest.raises(InvalidField, match="session_id"):
        parse_client_message('{"type": "pause", "session_id": "\\udfff"}')


def test_json_nested_a_thousand_deep_under_the_size_limit_is_malformed() -> None:
    with pytest.raises(MalformedMessage, match="nested too deeply"):
        parse_client_message("[" * 4000 + "]" * 4000)


def test_a_valid_prompt_with_any_other_unicode_still_parses() -> None:
    msg = parse_client_message(json.dumps({"type": "start", "prompt": "un renard roux 🦊 dans la neige"}))
    assert msg.prompt == "un renard roux 🦊 dans la neige"  # type: ignore[union-attr]


def test_a_version_that_is_not_the_integer_1_is_unsupported_and_names_the_readable_request() -> None:
    for version in ("2", "true", "1.0", '"1"'):
        with pytest.raises(UnsupportedVersion) as refused:
            parse_client_message(f'{{"type": "start", "v": {version}, "prompt": "a fox"}}')
        assert refused.value.request_type == "start", version
    assert parse_client_message('{"type": "start", "v": 1, "prompt": "a fox"}').TYPE == "start"
