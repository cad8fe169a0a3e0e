"""The interim placement rule: lowest predicted l(n + 1) among live, open workers of the session's model."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.scheduler.placement import WorkerLoad, choose_worker, reference_latency_ms


def worker(worker_id: str, active: int, *, capacity: int = 4, model: str = "tiny", live: bool = True,
           draining: bool = False) -> WorkerLoad:
    return WorkerLoad(worker_id, model, capacity, active, live, draining)


def test_the_reference_latency_model_gives_the_papers_figures() -> None:
    assert reference_latency_ms(1, 4) == pytest.approx(181.125)
    assert reference_latency_ms(4, 4) == pytest.approx(363.0)


def test_the_reference_latency_model_refuses_an_empty_worker() -> None:
    with pytest.raises(ValueError, match="sessions >= 1"):
        reference_latency_ms(0, 4)


def test_a_session_goes_to_the_least_loaded_worker_and_the_reason_says_why() -> None:
    choice = choose_worker([worker("w1", 2), worker("w2", 1), worker("w3", 3)], model="tiny")
    assert choice.worker_id == "w2"
    assert choice.predicted_latency_ms == pytest.approx(reference_latency_ms(2, 4))
    assert "w2" in choice.reason and "2/4" in choice.reason


def test_a_bigger_worker_wins_when_it_predicts_a_lower_latency_at_the_same_load() -> None:
    choice = choose_worker([worker("small", 1, capacity=2), worker("big", 1, capacity=8)], model="tiny")
    assert choice.worker_id == "big"


def test_ties_go_to_the_smaller_id_so_the_choice_is_deterministic() -> None:
    assert choose_worker([worker("w2", 1), worker("w1", 1)], model="tiny").worker_id == "w1"


def test_full_draining_lost_and_other_model_workers_are_never_chosen() -> None:
    workers = [
        worker("full", 4),
        worker("draining", 0, draining=True),
        worker("lost", 0, live=False),
        worker("other", 0, model="wan-1.3b"),
    ]
    choice = choose_worker(workers, model="tiny")
    assert choice.worker_id is None and choice.predicted_latency_ms is None
    assert choice.reason == "all 2 live workers of model 'tiny' are full or draining"


def test_no_live_worker_of_the_model_is_reported_as_such() -> None:
    choice = choose_worker([worker("lost", 0, live=False)], model="tiny")
    assert (choice.worker_id, choice.reason) == (None, "no live worker serves model 'tiny'")


workers_strategy = st.lists(
    st.builds(
        WorkerLoad,
        worker_id=st.text("abc", min_size=1, max_size=3),
        model=st.sampled_from(["tiny", "wan-1.3b"]),
        capacity=st.integers(1, 8),
        active_sessions=st.integers(0, 8),
        live=st.booleans(),
        draining=st.booleans(),
    ),
    max_size=12,
)


@given(workers_strategy)
def test_the_choice_is_an_eligible_worker_with_the_lowest_predicted_latency(workers: list[WorkerLoad]) -> None:
    eligible = [
        w for w in workers if w.live and not w.draining and w.model == "tiny" and w.active_sessions < w.capacity
    ]
    choice = choose_worker(workers, model="tiny")
    if not eligible:
        assert choice.worker_id is None
        return
    chosen = [w for w in eligible if w.worker_id == choice.worker_id]
    assert chosen, f"{choice.worker_id} is not eligible"
    best_ms = min(reference_latency_ms(w.active_sessions + 1, w.capacity) for w in eligible)
    assert choice.predicted_latency_ms == pytest.approx(best_ms)
