"""Sessions stay with their token, count against its limit while they linger, and have one driver at a time."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidState, LimitExceeded, UnknownSession
from services.gateway.registry import SessionRegistry


def registry_with(max_sessions: int = 2) -> SessionRegistry[str]:
    registry: SessionRegistry[str] = SessionRegistry(max_sessions)
    registry.admit("alice", "s1", "session one", connection_id=1)
    return registry


def test_a_token_over_its_limit_is_refused_with_limit_exceeded_and_others_are_not() -> None:
    registry = registry_with(max_sessions=2)
    registry.admit("alice", "s2", "session two", connection_id=1)
    with pytest.raises(LimitExceeded, match="limit 2"):
        registry.admit("alice", "s3", "session three", connection_id=1)
    registry.admit("bob", "s4", "bob's", connection_id=2)
    registry.remove("s1")
    registry.admit("alice", "s3", "session three", connection_id=1)
    assert registry.count("alice") == 2


def test_another_tokens_session_is_unknown_whatever_the_operation() -> None:
    registry = registry_with()
    with pytest.raises(UnknownSession):
        registry.get("bob", "s1", connection_id=1)
    with pytest.raises(UnknownSession):
        registry.adopt("bob", "s1", connection_id=2)
    registry.detach_connection(1)
    with pytest.raises(UnknownSession):
        registry.adopt("bob", "s1", connection_id=2)


def test_a_second_connection_of_the_same_token_cannot_drive_a_live_session() -> None:
    registry = registry_with()
    with pytest.raises(InvalidState, match="another connection"):
        registry.get("alice", "s1", connection_id=9)
    with pytest.raises(InvalidState, match="another connection"):
        registry.adopt("alice", "s1", connection_id=9)


def test_a_detached_session_lingers_counted_and_is_adopted_by_the_same_token() -> None:
    registry = registry_with(max_sessions=1)
    assert registry.detach_connection(1) == [("s1", "session one")]
    assert registry.is_detached("s1") and registry.count("alice") == 1
    with pytest.raises(LimitExceeded):
        registry.admit("alice", "s2", "another", connection_id=2)
    with pytest.raises(InvalidState, match="resume"):
        registry.get("alice", "s1", connection_id=2)
    assert registry.adopt("alice", "s1", connection_id=2) == "session one"
    assert registry.get("alice", "s1", connection_id=2) == "session one"


def test_removing_twice_is_harmless_and_frees_the_slot_once() -> None:
    registry = registry_with()
    registry.remove("s1")
    registry.remove("s1")
    assert registry.count("alice") == 0 and len(registry) == 0
