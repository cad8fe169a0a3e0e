"""The resident-session bookkeeping: prompt schedule, credit, replay and the send cursor."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidState
from services.gpu_worker.model.interface import SessionHandle
from services.gpu_worker.session import EncodedChunk, ResidentSession


def make_session(**overrides: object) -> ResidentSession:
    fields: dict[str, object] = {
        "session_id": "s1", "epoch": 1, "seed": 7, "handle": SessionHandle("s1", 0),
        "prompts": [(0, "first")], "replay_depth": 3,
    }
    fields.update(overrides)
    return ResidentSession(**fields)  # type: ignore[arg-type]


def chunk(seq: int) -> EncodedChunk:
    return EncodedChunk(seq=seq, first_frame=seq * 12, frames=[b"x"], timings_ms={})


def test_a_prompt_change_applies_from_its_chunk_on_and_earlier_chunks_keep_the_old_prompt() -> None:
    session = make_session()
    session.change_prompt(3, "second")
    assert [session.prompt_for(seq) for seq in range(5)] == ["first"] * 3 + ["second"] * 2


def test_a_prompt_change_for_an_already_generated_chunk_is_refused() -> None:
    session = make_session()
    session.record(chunk(0))
    session.record(chunk(1))
    with pytest.raises(InvalidState):
        session.change_prompt(1, "too late")


def test_a_later_prompt_change_replaces_the_schedule_after_its_start() -> None:
    session = make_session()
    session.change_prompt(5, "b")
    session.change_prompt(2, "c")
    assert session.prompts == [(0, "first"), (2, "c")]


def test_only_credited_chunks_are_sent_and_each_only_once() -> None:
    session = make_session()
    session.credit_up_to = 1
    for seq in range(3):
        session.record(chunk(seq))
    assert [c.seq for c in session.sendable()] == [0, 1]
    assert session.sendable() == []
    session.credit_up_to = 2
    assert [c.seq for c in session.sendable()] == [2]


def test_silent_catch_up_chunks_are_never_sent() -> None:
    session = make_session(silent_until=2, next_send_seq=2)
    session.credit_up_to = 5
    assert session.wants_generation()
    for seq in range(3):
        session.record(chunk(seq))
    assert [c.seq for c in session.sendable()] == [2]


def test_the_replay_buffer_keeps_only_the_newest_chunks() -> None:
    session = make_session()
    for seq in range(5):
        session.record(chunk(seq))
    assert [c.seq for c in session.replay] == [2, 3, 4]
    assert session.can_replay_from(2) and session.can_replay_from(7)
    assert not session.can_replay_from(1)


def test_a_session_wants_generation_only_while_it_has_credit_or_catch_up_left() -> None:
    session = make_session()
    assert not session.wants_generation()
    session.credit_up_to = 0
    assert session.wants_generation()
    session.record(chunk(0))
    assert not session.wants_generation()
