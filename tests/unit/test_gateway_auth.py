"""Tokens parse strictly, map to owner names, and are read from the handshake's header or query."""

from __future__ import annotations

import pytest

from services.common.config import ConfigError
from services.gateway.auth import TokenTable, parse_tokens, presented_token


def test_named_and_bare_tokens_map_to_owner_names() -> None:
    table = parse_tokens("alice=s3cret, bare-token ,")
    assert len(table) == 2
    assert table.owner_of("s3cret") == "alice"
    bare_owner = table.owner_of("bare-token")
    assert bare_owner is not None and bare_owner.startswith("token-") and "bare" not in bare_owner


@pytest.mark.parametrize("presented", [None, "", "alice", "s3cret ", "x" * 300])
def test_a_missing_or_wrong_token_has_no_owner(presented: str | None) -> None:
    assert TokenTable.from_mapping({"alice": "s3cret"}).owner_of(presented) is None


@pytest.mark.parametrize(
    "raw", ["", " , ", "alice=", "al ice=x", "alice=x,alice=y", "=x", "a" * 65 + "=x"],
    ids=["empty", "only_commas", "empty_secret", "space_in_name", "twice", "empty_name", "long_name"],
)
def test_a_bad_token_list_is_a_config_error_naming_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError, match="TURBOSERVE_TOKENS"):
        parse_tokens(raw)


def test_the_bearer_header_wins_over_the_query_parameter() -> None:
    assert presented_token("/ws?token=from-query", "Bearer from-header") == "from-header"
    assert presented_token("/ws?token=from-query", None) == "from-query"
    assert presented_token("/ws?token=from-query", "Basic abc") == "from-query"
    assert presented_token("/ws", None) is None
    assert presented_token("/ws?token=a%2Bb", None) == "a+b"
