"""The SchedulerStore contract, run against the in-memory store here and against PostgreSQL in
tests/integration/test_scheduler_postgres.py (which subclasses StoreContract)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from services.common.errors import LimitExceeded, StaleEpoch, UnknownSession
from services.common.messages import SessionStatus
from services.scheduler.store.memory import MemoryStore
from services.scheduler.store.protocol import (
    MAX_LATENCY_SAMPLES,
    SchedulerStore,
    SessionExists,
    SessionRecord,
    WorkerReport,
)

T0 = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)


def a_session(
    session_id: str, *, worker_id: str | None = "w1", status: SessionStatus = "active", minute: int = 0
) -> SessionRecord:
    at = T0 + timedelta(minutes=minute)
    return SessionRecord(
        session_id=session_id, owner="owner", prompt="a red fox", seed=7, model="tiny", status=status,
        worker_id=worker_id, epoch=1, chunks_produced=0, next_seq=0, created_at=at, updated_at=at,
    )


def a_report(worker_id: str, samples: tuple[tuple[int, float], ...] = (), *, draining: bool = False) -> WorkerReport:
    return WorkerReport(
        worker_id=worker_id, kind="cpu", model="tiny", capacity=4, active_sessions=1, draining=draining,
        started_at=T0, latency_samples=samples,
    )


class StoreContract:
    """Subclasses provide a ``store`` fixture yielding an empty store."""

    async def test_what_a_policy_learnt_reads_back_as_kept_last_and_apart_from_other_policies(
        self, store: SchedulerStore
    ) -> None:
        assert await store.load_learnt("ours") is None
        state = {"version": 1, "budget": {"active_s": 3600.0, "last_age_s": None}, "bands": {"3": [0.5, 1.25]}}
        await store.save_learnt("ours", state, T0)
        await store.save_learnt("paper", {"version": 1}, T0)
        assert await store.load_learnt("ours") == (state, T0)
        later = {**state, "budget": {"active_s": 7200.0, "last_age_s": 2.0}}
        await store.save_learnt("ours", later, T0 + timedelta(seconds=30))
        assert await store.load_learnt("ours") == (later, T0 + timedelta(seconds=30))
        assert await store.load_learnt("paper") == ({"version": 1}, T0)

    async def test_the_record_of_workers_asked_for_holds_exactly_what_was_saved_last(
        self, store: SchedulerStore
    ) -> None:
        assert await store.list_asks() == {}
        asked = {"w1": T0, "pending-3f2a": T0 + timedelta(seconds=5)}
        await store.save_asks(asked)
        assert await store.list_asks() == asked
        later = {"pending-3f2a": T0 + timedelta(seconds=5), "w2": T0 + timedelta(seconds=9)}  # w1 given back
        await store.save_asks(later)
        assert await store.list_asks() == later
        await store.save_asks({})
        assert await store.list_asks() == {}

    async def test_an_inserted_session_reads_back_equal(self, store: SchedulerStore) -> None:
        session = a_session("s1")
        await store.insert_session(session)
        assert await store.get_session("s1") == session
        assert await store.get_session("nope") is None

    async def test_inserting_a_session_id_twice_is_refused(self, store: SchedulerStore) -> None:
        await store.insert_session(a_session("s1"))
        with pytest.raises(SessionExists):
            await store.insert_session(a_session("s1", worker_id="w2"))

    async def test_a_move_bumps_the_epoch_by_one_and_a_second_move_from_the_same_epoch_is_refused(
        self, store: SchedulerStore
    ) -> None:
        await store.insert_session(a_session("s1"))
        moved = await store.move_session("s1", expected_epoch=1, worker_id="w2", status="active", at=T0)
        assert (moved.worker_id, moved.epoch) == ("w2", 2)
        with pytest.raises(StaleEpoch):
            await store.move_session("s1", expected_epoch=1, worker_id="w3", status="active", at=T0)
        assert await store.get_session("s1") == moved

    async def test_status_changes_keep_the_placement_and_are_fenced_by_the_epoch(self, store: SchedulerStore) -> None:
        await store.insert_session(a_session("s1"))
        later = T0 + timedelta(seconds=5)
        idle = await store.set_status("s1", expected_epoch=1, status="idle", next_seq=12, at=later)
        assert (idle.status, idle.worker_id, idle.epoch, idle.next_seq, idle.updated_at) == ("idle", "w1", 1, 12, later)
        with pytest.raises(StaleEpoch):
            await store.set_status("s1", expected_epoch=2, status="active", next_seq=None, at=later)
        with pytest.raises(UnknownSession):
            await store.set_status("nope", expected_epoch=1, status="active", next_seq=None, at=later)

    async def test_clearing_a_placement_keeps_the_epoch_so_the_next_move_bumps_it(self, store: SchedulerStore) -> None:
        await store.insert_session(a_session("s1"))
        cleared = await store.clear_placement("s1", expected_epoch=1, status="closed", at=T0)
        assert (cleared.worker_id, cleared.epoch, cleared.status) == (None, 1, "closed")

    async def test_only_a_session_never_placed_can_be_withdrawn(self, store: SchedulerStore) -> None:
        never = dataclasses.replace(a_session("never", worker_id=None), epoch=0)
        await store.insert_session(never)
        await store.insert_session(dataclasses.replace(a_session("placed", worker_id="w1"), epoch=1))
        await store.insert_session(dataclasses.replace(a_session("unplaced-later", worker_id=None), epoch=2))
        assert await store.withdraw_unplaced("never")
        assert await store.get_session("never") is None
        assert not await store.withdraw_unplaced("placed")
        assert not await store.withdraw_unplaced("unplaced-later")  # it was placed once: clients know it
        assert not await store.withdraw_unplaced("never")
        await store.insert_session(never)  # the id is free again

    async def test_the_per_token_limit_counts_open_sessions_of_that_owner_only(self, store: SchedulerStore) -> None:
        for index in range(2):
            await store.insert_session(a_session(f"a{index}"), max_open_per_owner=2)
        with pytest.raises(LimitExceeded, match="holds 2 sessions .limit 2."):
            await store.insert_session(a_session("a2"), max_open_per_owner=2)
        await store.insert_session(dataclasses.replace(a_session("b0"), owner="other"), max_open_per_owner=2)
        await store.clear_placement("a0", expected_epoch=1, status="closed", at=T0)
        await store.insert_session(a_session("a2"), max_open_per_owner=2)  # a closed one frees its slot
        with pytest.raises(SessionExists):
            await store.insert_session(a_session("a2"), max_open_per_owner=2)

    async def test_concurrent_admits_of_one_owner_never_overshoot_the_limit(self, store: SchedulerStore) -> None:
        results = await asyncio.gather(
            *(store.insert_session(a_session(f"c{index}"), max_open_per_owner=3) for index in range(8)),
            return_exceptions=True,
        )
        assert sum(r is None for r in results) == 3
        assert all(isinstance(r, LimitExceeded) for r in results if r is not None)

    async def test_a_claim_hands_the_session_to_another_gateway_of_the_same_owner_only(
        self, store: SchedulerStore
    ) -> None:
        until = T0 + timedelta(seconds=6)
        await store.insert_session(dataclasses.replace(a_session("s1"), gateway_id="g1", lease_until=until))
        with pytest.raises(UnknownSession):
            await store.claim_session("s1", owner="mallory", gateway_id="g2", lease_until=until)
        claimed = await store.claim_session("s1", owner="owner", gateway_id="g2", lease_until=until)
        assert (claimed.gateway_id, claimed.worker_id, claimed.epoch) == ("g2", "w1", 2)  # g1's credit is stale
        await store.clear_placement("s1", expected_epoch=2, status="closed", at=T0)
        with pytest.raises(UnknownSession):
            await store.claim_session("s1", owner="owner", gateway_id="g1", lease_until=until)

    async def test_the_prompt_history_grows_and_a_change_at_the_same_seq_replaces(self, store: SchedulerStore) -> None:
        await store.insert_session(dataclasses.replace(a_session("s1"), prompts=((0, "a red fox"),)))
        await store.record_prompt("s1", 12, "a fox in the snow")
        await store.record_prompt("s1", 12, "a fox in the rain")
        await store.record_prompt("s1", 30, "night falls")
        row = await store.get_session("s1")
        assert row is not None
        assert row.prompt_history == ((0, "a red fox"), (12, "a fox in the rain"), (30, "night falls"))
        with pytest.raises(UnknownSession):
            await store.record_prompt("nope", 1, "x")

    async def test_leases_renew_only_for_the_holding_gateway_and_a_lapsed_one_closes_once(
        self, store: SchedulerStore
    ) -> None:
        await store.insert_session(dataclasses.replace(a_session("s1"), gateway_id="g1", lease_until=T0))
        await store.insert_session(dataclasses.replace(a_session("s2"), gateway_id="g2", lease_until=T0))
        later = T0 + timedelta(seconds=30)
        assert await store.renew_leases("g1", {"s1": 7, "s2": 9}, later) == 1
        s1, s2 = await store.get_session("s1"), await store.get_session("s2")
        assert s1 is not None and (s1.lease_until, s1.next_seq) == (later, 7)
        assert s2 is not None and (s2.lease_until, s2.next_seq) == (T0, 0)
        assert await store.close_abandoned("s1", lapsed_before=T0 + timedelta(seconds=10), at=later) is None
        closed = await store.close_abandoned("s2", lapsed_before=T0 + timedelta(seconds=10), at=later)
        assert closed is not None and (closed.worker_id, closed.epoch) == ("w1", 1)
        row = await store.get_session("s2")
        assert row is not None and (row.status, row.worker_id) == ("closed", None)
        assert await store.close_abandoned("s2", lapsed_before=T0 + timedelta(seconds=10), at=later) is None

    async def test_listed_sessions_are_the_open_ones_oldest_first(self, store: SchedulerStore) -> None:
        await store.insert_session(a_session("late", worker_id=None, minute=2))
        await store.insert_session(a_session("early", worker_id="w1", status="idle", minute=1))
        await store.insert_session(a_session("gone", worker_id=None, status="closed"))
        assert [s.session_id for s in await store.list_sessions()] == ["early", "late"]

    async def test_an_owners_listed_sessions_are_only_its_own_open_ones(self, store: SchedulerStore) -> None:
        await store.insert_session(a_session("mine", minute=1))
        await store.insert_session(dataclasses.replace(a_session("theirs", minute=0), owner="someone else"))
        await store.insert_session(a_session("mine-closed", worker_id=None, status="closed"))
        assert [s.session_id for s in await store.list_sessions(owner="owner")] == ["mine"]
        assert await store.list_sessions(owner="nobody") == []

    async def test_chunk_counts_only_grow_and_only_from_the_sessions_worker(self, store: SchedulerStore) -> None:
        await store.insert_session(a_session("s1", worker_id="w1"))
        await store.insert_session(a_session("s2", worker_id="w2"))
        assert await store.record_chunks("w1", {"s1": 5, "s2": 9, "ghost": 3}, T0) == 1
        assert await store.record_chunks("w1", {"s1": 4}, T0) == 0
        counts = [await store.get_session(session_id) for session_id in ("s1", "s2")]
        assert [session.chunks_produced if session else None for session in counts] == [5, 0]

    async def test_a_heartbeat_revives_a_lost_worker_and_keeps_only_the_newest_samples(
        self, store: SchedulerStore
    ) -> None:
        first = tuple((1, float(i)) for i in range(MAX_LATENCY_SAMPLES - 4))
        await store.upsert_worker(a_report("w1", first), T0)
        assert await store.retire_worker("w1", "lost")
        later = T0 + timedelta(seconds=9)
        worker = await store.upsert_worker(a_report("w1", ((2, 500.0),) * 8, draining=True), later)
        assert (worker.status, worker.draining, worker.last_seen) == ("live", True, later)
        assert len(worker.latency_samples) == MAX_LATENCY_SAMPLES
        assert worker.latency_samples[0] == (1, 4.0) and worker.latency_samples[-1] == (2, 500.0)
        assert await store.list_workers() == [worker]

    async def test_a_worker_is_lost_only_from_live_and_gone_is_final_until_it_beats_again(
        self, store: SchedulerStore
    ) -> None:
        await store.upsert_worker(a_report("w1"), T0)
        assert await store.retire_worker("w1", "lost")
        assert not await store.retire_worker("w1", "lost")
        assert await store.retire_worker("w1", "gone")
        assert not await store.retire_worker("w1", "lost")
        assert not await store.retire_worker("nope", "gone")
        assert [w.status for w in await store.list_workers()] == ["gone"]


class TestMemoryStore(StoreContract):
    @pytest.fixture
    async def store(self) -> AsyncIterator[SchedulerStore]:
        store = MemoryStore()
        yield store
        await store.close()
