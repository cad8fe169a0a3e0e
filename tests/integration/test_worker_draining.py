"""A draining worker keeps its own sessions but takes no new ones, and says so in its heartbeats (real NATS)."""

from __future__ import annotations

import asyncio
import dataclasses

import nats
import pytest

from services.common import subjects
from services.common.control import DrainWorker
from services.common.messages import AttachSession, Reply, WorkerHeartbeat
from services.common.wire import decode, encode
from services.gpu_worker.engine import ChunkEngine
from services.gpu_worker.frames import JpegEncoder
from services.gpu_worker.model import get_config
from services.gpu_worker.runner import WorkerRunner
from services.gpu_worker.settings import WorkerSettings
from tests.synthetic_models import load_tiny

pytestmark = pytest.mark.integration


def attach(session_id: str) -> AttachSession:
    return AttachSession(session_id=session_id, epoch=1, seed=3, model="tiny", next_seq=0, prompts=((0, "dusk"),))


async def control(nc: nats.NATS, worker_id: str, request: AttachSession | DrainWorker) -> Reply:
    answer = decode((await nc.request(subjects.worker_control(worker_id), encode(request), timeout=10)).data)
    assert isinstance(answer, Reply)
    return answer


async def test_a_draining_worker_refuses_new_sessions_keeps_its_own_and_reports_draining(nats_url: str) -> None:
    config = get_config("tiny")
    settings = dataclasses.replace(
        WorkerSettings.from_env(), worker_id="drain-w1", heartbeat_interval_s=0.05, max_resident_sessions=4
    )

    async def emit(session_id: str, payload: bytes) -> None:
        await nc.publish(subjects.chunks(session_id), payload)

    nc = await nats.connect(nats_url)
    engine = ChunkEngine(
        load_tiny(max_sessions=4), JpegEncoder(80), emit, worker_id=settings.worker_id, model_name="tiny",
        frame_size=(config.width_px, config.height_px), max_batch=4, replay_depth=2,
    )
    beats: asyncio.Queue[WorkerHeartbeat] = asyncio.Queue()

    async def on_beat(msg: nats.aio.msg.Msg) -> None:
        beat = decode(msg.data)
        if isinstance(beat, WorkerHeartbeat) and beat.worker_id == settings.worker_id:
            await beats.put(beat)

    await nc.subscribe(subjects.SCHED_HEARTBEAT, cb=on_beat)
    stop = asyncio.Event()
    running = asyncio.create_task(WorkerRunner(settings, nc, engine).run(stop))
    try:
        assert not (await asyncio.wait_for(beats.get(), 10)).draining
        assert (await control(nc, settings.worker_id, attach("kept"))).ok
        assert (await control(nc, settings.worker_id, DrainWorker(settings.worker_id, "scale-in"))).ok
        refused = await control(nc, settings.worker_id, attach("newcomer"))
        assert (refused.ok, refused.code) == (False, "unavailable")
        assert (await control(nc, settings.worker_id, attach("kept"))).ok  # its own session is still served
        while not (await asyncio.wait_for(beats.get(), 10)).draining:
            pass
    finally:
        stop.set()
        await running
        await nc.close()


async def test_a_control_message_that_fails_unexpectedly_is_answered_internal_at_once(nats_url: str) -> None:
    """Before the shared endpoint skeleton, only TurboServeErrors were answered: this attach left its caller
    waiting out the whole request timeout."""
    config = get_config("tiny")
    settings = dataclasses.replace(WorkerSettings.from_env(), worker_id="broken-w1", heartbeat_interval_s=0.05)
    nc = await nats.connect(nats_url)

    async def emit(session_id: str, payload: bytes) -> None:
        await nc.publish(subjects.chunks(session_id), payload)

    engine = ChunkEngine(
        load_tiny(max_sessions=2), JpegEncoder(80), emit, worker_id=settings.worker_id, model_name="tiny",
        frame_size=(config.width_px, config.height_px), max_batch=2, replay_depth=2,
    )

    async def broken_attach(_: AttachSession) -> None:
        raise RuntimeError("a bug in attach")

    engine.attach = broken_attach  # type: ignore[method-assign]
    stop = asyncio.Event()
    running = asyncio.create_task(WorkerRunner(settings, nc, engine).run(stop))
    try:
        started = asyncio.get_running_loop().time()
        for _ in range(100):  # until the worker's endpoint is up
            try:
                answer = await control(nc, settings.worker_id, attach("s1"))
                break
            except nats.errors.NoRespondersError:
                await asyncio.sleep(0.05)
        assert (answer.ok, answer.code) == (False, "internal")
        assert asyncio.get_running_loop().time() - started < 5.0
    finally:
        stop.set()
        await running
        await nc.close()
