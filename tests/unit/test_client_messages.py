"""Inputs a fuzzer found answered `internal`: each is now a documented, typed refusal."""

from __future__ import annotations

import json

import pytest

from services.common.client_messages import parse_client_message
from services.common.errors import InvalidField, MalformedMessage


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
