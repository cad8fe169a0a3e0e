"""The worker's MigrationAgent on both ends, two engines in one process over gloo on localhost: the session moves
with its cursors and replay buffer, and a target whose source never comes frees its reservation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import torch

from services.common.control import MigrationReport, PrepareMigration, StartMigration
from services.common.messages import RequestChunks
from services.gpu_worker.engine import ChunkEngine
from services.gpu_worker.frames import JpegEncoder
from services.gpu_worker.migration.agent import MigrationAgent
from services.gpu_worker.model import StreamingVideoModel
from tests.synthetic_models import load_tiny
from tests.unit.test_worker_engine import CONFIG, Captured, assert_same_frames, attach

CPU = torch.device("cpu")


class Side:
    """One worker: a model of its own, an engine running its batch loop, an agent whose reports are kept."""

    def __init__(self, worker_id: str, model: StreamingVideoModel, captured: Captured) -> None:
        self.engine = ChunkEngine(
            model, JpegEncoder(90), captured.emit, worker_id=worker_id, model_name="tiny",
            frame_size=(CONFIG.width_px, CONFIG.height_px), max_batch=4, replay_depth=4,
        )
        self.reports: asyncio.Queue[MigrationReport] = asyncio.Queue()
        self.agent = MigrationAgent(self.engine, model, self._report, worker_id=worker_id, host="127.0.0.1",
                                    device=CPU, max_state_bytes=1 << 30, timeout_s=20.0)

    async def _report(self, report: MigrationReport) -> None:
        await self.reports.put(report)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Side, Side, Captured]]:
    captured = Captured()  # both workers publish to the same subjects, as over NATS
    source = Side("w1", load_tiny(max_sessions=4), captured)
    target = Side("w2", load_tiny(max_sessions=4), captured)
    stop = asyncio.Event()
    loops = [asyncio.create_task(side.engine.run(stop)) for side in (source, target)]
    try:
        yield source, target, captured
    finally:
        stop.set()
        await asyncio.gather(*loops)
        await source.agent.close()
        await target.agent.close()


async def test_a_streaming_session_moves_with_its_replay_buffer_and_continues_with_identical_frames(
    pair: tuple[Side, Side, Captured],
) -> None:
    source, target, captured = pair
    await source.engine.attach(attach("ref", seed=21))
    await source.engine.attach(attach("s", seed=21))
    await source.engine.credit(RequestChunks(session_id="ref", epoch=1, up_to_seq=7))
    await source.engine.credit(RequestChunks(session_id="s", epoch=1, up_to_seq=4))
    reference = await captured.wait_for("ref", 8)
    await captured.wait_for("s", 5)  # the client got 0..2 only: 3 and 4 must come from the moved replay buffer
    ticket = await target.agent.prepare(PrepareMigration("s", 1, "w1", timeout_s=20.0))
    await source.agent.start(StartMigration("s", 1, "w2", ticket.host, ticket.port, "test"))
    report = await asyncio.wait_for(source.reports.get(), 30)
    assert report.outcome == "copied", report
    assert "s" not in source.engine.sessions
    for _ in range(100):  # the target adopts the session once its receive thread hands it back
        if "s" in target.engine.sessions:
            break
        await asyncio.sleep(0.05)
    moved = target.engine.sessions["s"]
    assert moved.next_seq == report.next_seq and moved.replay and moved.replay[-1].seq == report.next_seq - 1
    await target.engine.attach(attach("s", seed=21, epoch=2, next_seq=3))
    assert target.engine.sessions["s"] is moved  # resumed from the moved state, not rebuilt
    await target.engine.credit(RequestChunks(session_id="s", epoch=2, up_to_seq=7))
    after = [(h, f) for h, f in await captured.wait_for("s", 10) if h.epoch == 2]
    assert [h.seq for h, _ in after] == [3, 4, 5, 6, 7] and {h.worker_id for h, _ in after} == {"w2"}
    for (_, want), (_, got) in zip(reference[3:], after, strict=True):
        assert_same_frames(want, got)


async def test_a_target_whose_source_never_connects_frees_its_reservation_at_the_deadline(
    pair: tuple[Side, Side, Captured],
) -> None:
    _, target, _ = pair
    await target.agent.prepare(PrepareMigration("ghost", 1, "w1", timeout_s=0.5))
    assert target.agent.busy("ghost")
    for _ in range(100):
        if not target.agent.busy("ghost"):
            break
        await asyncio.sleep(0.05)
    assert not target.agent.busy("ghost") and "ghost" not in target.engine.sessions
