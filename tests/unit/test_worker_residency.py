"""Offload, restore, periodic snapshots and the migration blob on the real tiny model, with the state store and
NATS replaced by in-memory fakes."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Sequence

import pytest
import torch

from services.common.control import OffloadSession
from services.common.errors import InvalidState
from services.common.messages import RequestChunks
from services.gpu_worker.engine import ChunkEngine, SessionTable
from services.gpu_worker.frames import JpegEncoder
from services.gpu_worker.migration.agent import (
    blob_capacity,
    pack_session,
    unpack_session,
)
from services.gpu_worker.model import StreamingVideoModel
from services.gpu_worker.session import EncodedChunk, ResidentSession
from services.gpu_worker.state.offload import HostState, Residency, SessionStateManager, StagedRestore
from services.gpu_worker.state.residency import SessionResidency, StoreSpill
from services.state_store.errors import StaleSnapshot
from services.state_store.protocol import Snapshot
from tests.synthetic_models import load_tiny
from tests.unit.test_worker_engine import CONFIG, Captured, assert_same_frames, attach


class MemorySnapshots:
    """The SnapshotClient calls residency makes, fenced by (epoch, chunk_seq) like the service."""

    def __init__(self) -> None:
        self.latest: dict[str, Snapshot] = {}
        self.stored = asyncio.Condition()

    async def put(self, session_id: str, epoch: int, chunk_seq: int, manifest: dict[str, object],
                  buffers: Sequence[bytes]) -> None:
        held = self.latest.get(session_id)
        if held is not None and (held.epoch, held.chunk_seq) >= (epoch, chunk_seq):
            raise StaleSnapshot(f"{session_id} already at {held.epoch}/{held.chunk_seq}")
        async with self.stored:
            views = tuple(memoryview(bytearray(b)) for b in buffers)
            self.latest[session_id] = Snapshot(session_id, epoch, chunk_seq, 0.0, manifest, views)
            self.stored.notify_all()

    async def get_latest(self, session_id: str) -> Snapshot | None:
        return self.latest.get(session_id)

    async def wait_for(self, session_id: str, chunk_seq: int) -> Snapshot:
        async with self.stored:
            await asyncio.wait_for(self.stored.wait_for(
                lambda: session_id in self.latest and self.latest[session_id].chunk_seq >= chunk_seq), 30)
        return self.latest[session_id]


@pytest.fixture(scope="module")
def model() -> StreamingVideoModel:
    return load_tiny(max_sessions=8)


Worker = tuple[ChunkEngine, SessionResidency, MemorySnapshots, Captured]


@contextlib.asynccontextmanager
async def running_worker(model: StreamingVideoModel, host_budget_bytes: int) -> AsyncIterator[Worker]:
    captured, snapshots, table = Captured(), MemorySnapshots(), SessionTable()
    manager = SessionStateManager(
        model, device=torch.device("cpu"), device_budget_bytes=1 << 30, host_budget_bytes=host_budget_bytes,
        spill_target=StoreSpill(table, snapshots, asyncio.get_running_loop()),  # type: ignore[arg-type]
    )
    residency = SessionResidency(table, manager, snapshots, every_chunks=2)  # type: ignore[arg-type]
    engine = ChunkEngine(
        model, JpegEncoder(90), captured.emit, worker_id="w1", model_name="tiny",
        frame_size=(CONFIG.width_px, CONFIG.height_px), max_batch=4, replay_depth=3, table=table, hooks=residency,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(engine.run(stop))
    yield engine, residency, snapshots, captured
    stop.set()
    await task
    await residency.close()
    for session in list(engine.sessions.values()):
        await engine._release(session)


@pytest.fixture
async def worker(model: StreamingVideoModel) -> AsyncIterator[Worker]:
    async with running_worker(model, host_budget_bytes=1 << 30) as running:
        yield running


async def offload_one_of_two(worker: Worker, kept: str, moved: str, up_to_seq: int) -> None:
    """Both sessions stream chunks 0..``up_to_seq``; then ``moved`` is offloaded to host memory."""
    engine, residency, _, captured = worker
    for sid in (kept, moved):
        await engine.attach(attach(sid, seed=4))
        await engine.credit(RequestChunks(session_id=sid, epoch=1, up_to_seq=up_to_seq))
    await captured.wait_for(moved, up_to_seq + 1)
    await residency.offload(OffloadSession(moved, 1, "test"))


async def test_past_the_host_budget_the_oldest_offloaded_state_spills_to_the_store_and_still_restores_exactly(
    model: StreamingVideoModel,
) -> None:
    async with running_worker(model, host_budget_bytes=1_000_000) as (engine, residency, _, captured):  # one state
        for sid in ("ref", "first", "second"):
            await engine.attach(attach(sid, seed=8))
            await engine.credit(RequestChunks(session_id=sid, epoch=1, up_to_seq=1))
        await captured.wait_for("first", 2)
        await captured.wait_for("second", 2)
        await residency.offload(OffloadSession("first", 1, "test"))
        await residency.offload(OffloadSession("second", 1, "test"))
        assert residency._manager.host_state("first").residency is Residency.SPILLED
        for sid in ("ref", "first"):
            await engine.credit(RequestChunks(session_id=sid, epoch=1, up_to_seq=3))
        want, got = await captured.wait_for("ref", 4), await captured.wait_for("first", 4)
        assert [h.seq for h, _ in got] == [0, 1, 2, 3]
        assert_same_frames(want[3][1], got[3][1])


async def test_an_idle_session_offloaded_to_host_frees_its_slot_and_credit_restores_it_with_identical_frames(
    worker: Worker, model: StreamingVideoModel,
) -> None:
    engine, residency, snapshots, captured = worker
    await offload_one_of_two(worker, "kept", "moved", up_to_seq=2)
    assert residency.offloaded() == ("moved",) and snapshots.latest["moved"].chunk_seq == 2
    assert residency.state_bytes["moved"] > 0
    for sid in ("kept", "moved"):
        await engine.credit(RequestChunks(session_id=sid, epoch=1, up_to_seq=5))
    kept, moved = await captured.wait_for("kept", 6), await captured.wait_for("moved", 6)
    assert [h.seq for h, _ in moved] == list(range(6)) and residency.offloaded() == ()
    ((restored_bytes, restore_ms),) = residency.drain_restore_samples()  # for the scheduler's resume penalty
    assert restored_bytes == residency.state_bytes["moved"] and restore_ms > 0
    assert residency.drain_restore_samples() == ()
    for (_, want), (_, got) in zip(kept[3:], moved[3:], strict=True):
        assert_same_frames(want, got)


async def test_a_restore_readies_its_host_copy_beside_the_running_batches_and_takes_the_model_only_to_import(
    worker: Worker, model: StreamingVideoModel,
) -> None:
    engine, residency, _, captured = worker
    await offload_one_of_two(worker, "busy", "idle", up_to_seq=1)
    copy_landed = threading.Event()
    manager = residency._manager
    stage = manager.stage_restore

    def slow_copy(state: HostState) -> StagedRestore:
        staged = stage(state)
        staged.ticket.wait = lambda: copy_landed.wait(30)  # type: ignore[method-assign]
        return staged

    manager.stage_restore = slow_copy  # type: ignore[method-assign]
    resume = asyncio.create_task(engine.credit(RequestChunks(session_id="idle", epoch=1, up_to_seq=4)))
    await engine.credit(RequestChunks(session_id="busy", epoch=1, up_to_seq=4))
    await captured.wait_for("busy", 5)  # its batches ran while the other session's host copy was still being readied
    assert not resume.done()
    copy_landed.set()
    await resume
    assert [h.seq for h, _ in await captured.wait_for("idle", 5)] == list(range(5))


async def test_a_resume_cancelled_while_its_host_copy_is_readied_leaves_the_state_offloaded_and_the_budget_free(
    worker: Worker, model: StreamingVideoModel,
) -> None:
    engine, residency, _, captured = worker
    await offload_one_of_two(worker, "busy", "idle", up_to_seq=1)
    copy_landed, copying = threading.Event(), threading.Event()
    manager = residency._manager
    stage = manager.stage_restore

    def slow_copy(state: HostState) -> StagedRestore:
        staged = stage(state)

        def wait() -> None:
            copying.set()
            copy_landed.wait(30)
        staged.ticket.wait = wait  # type: ignore[method-assign]
        return staged

    manager.stage_restore = slow_copy  # type: ignore[method-assign]
    idle = engine.sessions["idle"]
    resume = asyncio.create_task(residency.ensure_resident(idle))
    await asyncio.to_thread(copying.wait, 30)
    assert manager.device_bytes > 0  # claimed while the host copy is readied
    resume.cancel()
    with pytest.raises(asyncio.CancelledError):
        await resume
    copy_landed.set()
    assert idle.offloaded and residency.offloaded() == ("idle",)
    assert "idle" not in manager._device_bytes
    manager.stage_restore = stage  # type: ignore[method-assign]
    await engine.credit(RequestChunks(session_id="idle", epoch=1, up_to_seq=3))
    assert [h.seq for h, _ in await captured.wait_for("idle", 4)] == list(range(4))


async def test_a_session_with_credit_outstanding_is_not_offloaded(
    worker: Worker,
) -> None:
    engine, residency, _, _ = worker
    await engine.attach(attach("busy"))
    await engine.credit(RequestChunks(session_id="busy", epoch=1, up_to_seq=1000))
    with pytest.raises(InvalidState):
        await residency.offload(OffloadSession("busy", 1, "test"))


async def test_a_fresh_attach_continues_from_the_latest_snapshot_and_regenerates_only_after_it(
    worker: Worker,
) -> None:
    engine, _, snapshots, captured = worker
    await engine.attach(attach("ref", seed=11))
    await engine.credit(RequestChunks(session_id="ref", epoch=1, up_to_seq=5))
    await engine.attach(attach("s", seed=11))
    await engine.credit(RequestChunks(session_id="s", epoch=1, up_to_seq=3))
    reference = await captured.wait_for("ref", 6)
    await captured.wait_for("s", 4)
    latest = await snapshots.wait_for("s", 2)  # every 2 chunks at the session's own phase: after chunk 2 or 3
    await engine._release(engine.sessions["s"])
    await engine.attach(attach("s", seed=11, epoch=2, next_seq=5))
    assert engine.sessions["s"].next_seq == latest.chunk_seq + 1  # regeneration starts after the snapshot, not at 0
    await engine.credit(RequestChunks(session_id="s", epoch=2, up_to_seq=5))
    again = await captured.wait_for("s", 5)
    assert again[-1][0].seq == 5 and again[-1][0].epoch == 2
    assert_same_frames(reference[5][1], again[-1][1])


def test_the_migration_blob_carries_cursors_prompts_and_the_replay_buffer_at_a_fixed_size() -> None:
    from services.gpu_worker.model.interface import SessionHandle

    handle = SessionHandle("s", 0)
    session = ResidentSession(session_id="s", epoch=3, seed=7, handle=handle, prompts=[(0, "a"), (4, "b")],
                              replay_depth=2, next_seq=6, next_send_seq=5, silent_until=2)
    session.replay.extend([EncodedChunk(4, 48, [b"x" * 10], {"model_ms": 1.0}), EncodedChunk(5, 60, [b"y"], {})])
    capacity = blob_capacity(session)
    blob = pack_session(session, capacity)
    session.replay.popleft()
    assert pack_session(session, capacity).shape == blob.shape == (capacity,)
    back = unpack_session(blob, "s", handle)
    assert (back.epoch, back.seed, back.prompts, back.next_seq, back.next_send_seq, back.silent_until) == (
        3, 7, [(0, "a"), (4, "b")], 6, 5, 2)
    assert [(c.seq, c.frames) for c in back.replay] == [(4, [b"x" * 10]), (5, [b"y"])]
    assert back.active_prompt == "a" and back.credit_up_to == -1


def test_sessions_in_lockstep_take_their_snapshots_at_different_chunks_each_at_its_own_period() -> None:
    residency = SessionResidency(None, None, None, every_chunks=4)  # type: ignore[arg-type]
    due = {sid: [n for n in range(1, 13) if residency.snapshot_due(sid, n)] for sid in (f"s{i}" for i in range(8))}
    for chunks in due.values():
        assert len(chunks) == 3 and chunks[1] - chunks[0] == chunks[2] - chunks[1] == 4, "every 4 chunks"
    assert len({chunks[0] for chunks in due.values()}) > 1, "not all 8 after the same batch"
