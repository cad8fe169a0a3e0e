"""What a worker says in its heartbeats (real NATS, the tiny model): that it drains (keeping its own sessions,
taking no new ones), and K as its batches measure it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator

import nats
import pytest

from services.common import subjects
from services.common.control import DrainWorker
from services.common.messages import AttachSession, Reply, RequestChunks, WorkerHeartbeat
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


@contextlib.asynccontextmanager
async def heartbeating_worker(
    nats_url: str, settings: WorkerSettings, max_batch: int
) -> AsyncIterator[tuple[nats.NATS, asyncio.Queue[WorkerHeartbeat]]]:
    """A worker runner on the tiny model, and the queue its heartbeats arrive in."""
    config = get_config("tiny")
    nc = await nats.connect(nats_url)

    async def emit(session_id: str, payload: bytes) -> None:
        await nc.publish(subjects.chunks(session_id), payload)

    engine = ChunkEngine(
        load_tiny(max_sessions=max_batch), JpegEncoder(80), emit, worker_id=settings.worker_id, model_name="tiny",
        frame_size=(config.width_px, config.height_px), max_batch=max_batch, replay_depth=2,
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
        yield nc, beats
    finally:
        stop.set()
        await running
        await nc.close()


async def test_a_draining_worker_refuses_new_sessions_keeps_its_own_and_reports_draining(nats_url: str) -> None:
    settings = dataclasses.replace(
        WorkerSettings.from_env(), worker_id="drain-w1", heartbeat_interval_s=0.05, max_resident_sessions=4
    )
    async with heartbeating_worker(nats_url, settings, max_batch=4) as (nc, beats):
        assert not (await asyncio.wait_for(beats.get(), 10)).draining
        assert (await control(nc, settings.worker_id, attach("kept"))).ok
        assert (await control(nc, settings.worker_id, DrainWorker(settings.worker_id, "scale-in"))).ok
        refused = await control(nc, settings.worker_id, attach("newcomer"))
        assert (refused.ok, refused.code) == (False, "unavailable")
        assert (await control(nc, settings.worker_id, attach("kept"))).ok  # its own session is still served
        while not (await asyncio.wait_for(beats.get(), 10)).draining:
            pass


async def test_k_starts_at_the_ceiling_and_follows_the_measured_batches_of_paced_streams(nats_url: str) -> None:
    """A chunk every 200 ms: 64 streams of it are far beyond any machine running the tiny model on its CPU."""
    ceiling = 64
    settings = dataclasses.replace(WorkerSettings.from_env(), worker_id="k-w1", heartbeat_interval_s=0.05,
                                   capacity=ceiling, capacity_measured=True, max_resident_sessions=ceiling)
    async with heartbeating_worker(nats_url, settings, max_batch=2) as (nc, beats):
        assert (await asyncio.wait_for(beats.get(), 10)).capacity == ceiling, "nothing measured yet"
        assert (await control(nc, settings.worker_id, attach("paced"))).ok
        credit = RequestChunks("paced", 1, up_to_seq=3, due_unix_ms=time.time() * 1e3 + 600.0, interval_ms=200.0)
        await nc.publish(subjects.worker_credit(settings.worker_id), encode(credit))
        capacity = ceiling
        for _ in range(400):
            capacity = (await asyncio.wait_for(beats.get(), 10)).capacity
            if capacity < ceiling:
                break
        assert 1 <= capacity < ceiling, f"K stayed {capacity} after batches measured against a 200 ms interval"


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
