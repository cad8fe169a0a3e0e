"""Sessions stay with their token and have one driver at a time. (The per-token limit spans gateways: the
scheduler's store enforces it, tests/unit/test_scheduler_store_contract.py.)"""

from __future__ import annotations

import pytest

from services.common.errors import InvalidState, UnknownSession
from services.gateway.registry import SessionRegistry


def registry_with() -> SessionRegistry[str]:
    registry: SessionRegistry[str] = SessionRegistry()
    registry.admit("alice", "s1", "session one", connection_id=1)
    return registry


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


def test_a_detached_session_lingers_and_is_adopted_by_the_same_token() -> None:
    registry = registry_with()
    assert registry.detach_connection(1) == [("s1", "session one")]
    assert registry.is_detached("s1") and "s1" in registry
    with pytest.raises(InvalidState, match="resume"):
        registry.get("alice", "s1", connection_id=2)
    assert registry.adopt("alice", "s1", connection_id=2) == "session one"
    assert registry.get("alice", "s1", connection_id=2) == "session one"


def test_a_session_taken_over_from_another_gateway_waits_detached_for_its_resume() -> None:
    registry = registry_with()
    registry.admit("alice", "s2", "from elsewhere", connection_id=None)
    assert "s2" in registry and registry.is_detached("s2")
    assert registry.adopt("alice", "s2", connection_id=3) == "from elsewhere"


def test_removing_twice_is_harmless() -> None:
    registry = registry_with()
    registry.remove("s1")
    registry.remove("s1")
    assert "s1" not in registry and len(registry) == 0
