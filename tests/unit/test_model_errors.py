"""Bad input to the model raises typed errors and leaves resident sessions untouched."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from services.common.errors import InvalidField
from services.gpu_worker.model import (
    DuplicateSession,
    InvalidModelConfig,
    SessionHandle,
    SlotsExhausted,
    StateMismatch,
    UnknownModelConfig,
    UnknownSession,
    get_config,
)
from services.gpu_worker.model.config import DiTConfig
from tests.synthetic_models import load_tiny


def test_an_unknown_config_name_raises_unknown_model_config() -> None:
    with pytest.raises(UnknownModelConfig, match="no-such-model"):
        get_config("no-such-model")


def test_a_config_with_an_odd_head_dim_is_rejected_naming_the_fields() -> None:
    with pytest.raises(InvalidModelConfig, match="num_heads"):
        dataclasses.replace(get_config("tiny"), dit=DiTConfig(dim=128, num_heads=3))


def test_taking_more_sessions_than_slots_raises_slots_exhausted() -> None:
    model = load_tiny(max_sessions=2)
    model.new_session("a", "x", 0)
    model.new_session("b", "x", 0)
    with pytest.raises(SlotsExhausted):
        model.new_session("c", "x", 0)


def test_a_released_slot_can_be_taken_again() -> None:
    model = load_tiny(max_sessions=1)
    model.release(model.new_session("a", "x", 0))
    assert model.new_session("b", "x", 0).slot == 0


@pytest.mark.parametrize("operation", ["generate", "export_state", "set_prompt", "release"])
def test_an_unknown_or_stale_handle_raises_unknown_session(operation: str) -> None:
    model = load_tiny()
    live = model.new_session("live", "x", 0)
    stale = SessionHandle("gone", live.slot)
    calls: dict[str, Callable[[], object]] = {
        "generate": lambda: model.generate([stale]),
        "export_state": lambda: model.export_state(stale),
        "set_prompt": lambda: model.set_prompt(stale, "y"),
        "release": lambda: model.release(stale),
    }
    with pytest.raises(UnknownSession, match="gone"):
        calls[operation]()
    assert model.generate([live])[0].chunk_index == 0


def test_a_session_id_already_resident_or_repeated_in_a_batch_is_refused() -> None:
    model = load_tiny()
    handle = model.new_session("a", "x", 0)
    with pytest.raises(DuplicateSession):
        model.new_session("a", "x", 0)
    with pytest.raises(DuplicateSession):
        model.generate([handle, handle])


def test_importing_state_with_a_missing_name_or_wrong_shape_raises_state_mismatch() -> None:
    model = load_tiny()
    handle = model.new_session("a", "x", 0)
    model.generate([handle])
    state = model.export_state(handle)
    with pytest.raises(StateMismatch, match="rng_state"):
        model.import_state("b", {k: v for k, v in state.items() if k != "rng_state"})
    with pytest.raises(StateMismatch, match="kv"):
        model.import_state("b", state | {"kv": state["kv"][:, :, :-1]})
    with pytest.raises(StateMismatch, match="VAE cache"):
        model.import_state("b", {k: v for k, v in state.items() if k != "vae_cache.003"})
    with pytest.raises(StateMismatch, match="vae_cache.000"):
        model.import_state("b", state | {"vae_cache.000": state["vae_cache.000"][:, :1]})


def test_importing_into_a_full_model_raises_slots_exhausted() -> None:
    source = load_tiny()
    state = source.export_state(source.new_session("a", "x", 0))
    full = load_tiny(max_sessions=1)
    full.new_session("c", "x", 0)
    with pytest.raises(SlotsExhausted):
        full.import_state("a", state)


def test_a_negative_seed_is_refused() -> None:
    with pytest.raises(InvalidField, match="seed"):
        load_tiny().new_session("a", "x", -1)


def test_an_inverted_chunk_range_for_kv_rows_written_is_refused() -> None:
    with pytest.raises(ValueError, match="chunk range"):
        load_tiny().kv_rows_written(3, 2)
