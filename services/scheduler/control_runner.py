"""The control loop's NATS side and lifetime: placements and drains it sends, scale decisions it publishes, the
initial pool a local provisioner starts, and the task that runs the loop until the scheduler stops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import nats.errors
from nats.aio.client import Client as NatsClient

from services.common import subjects
from services.common.control import DrainWorker, ScaleDecision
from services.common.errors import TurboServeError
from services.common.messages import Placement, Reply
from services.common.wire import decode, encode
from services.scheduler.actuation import StateMover
from services.scheduler.control_loop import ControlLoop
from services.scheduler.control_settings import ControlSettings, build_live_controller, build_provisioner
from services.scheduler.store.protocol import SchedulerStore

log = logging.getLogger("turboserve.scheduler.control")


class NatsLoopIO:
    """ControlLoop's LoopIO over NATS, plus the external provisioner's publisher."""

    def __init__(self, nats: NatsClient, *, request_timeout_s: float = 2.0) -> None:
        self._nats = nats
        self._request_timeout_s = request_timeout_s

    async def publish_placement(self, placement: Placement) -> None:
        await self._nats.publish(subjects.placement(placement.session_id), encode(placement))

    async def publish_scale(self, decision: ScaleDecision) -> None:
        await self._nats.publish(subjects.SCHED_SCALE, encode(decision))

    async def drain(self, worker_id: str, reason: str) -> str:
        """The scheduler's own drain set is what keeps placements off the worker; the worker's answer is only
        logged (a worker that does not know DrainWorker refuses it, and is drained all the same)."""
        request = DrainWorker(worker_id, reason)
        try:
            msg = await self._nats.request(subjects.worker_control(worker_id), encode(request),
                                           timeout=self._request_timeout_s)
            answer = decode(msg.data)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, TurboServeError) as exc:
            return f"no answer: {exc}"
        if isinstance(answer, Reply):
            return "ok" if answer.ok else f"{answer.code}: {answer.detail}"
        return f"unexpected {answer.TYPE}"


@contextlib.asynccontextmanager
async def open_control_loop(
    settings: ControlSettings, nats: NatsClient, store: SchedulerStore, mover: StateMover, *, offload_after_s: float
) -> AsyncIterator[ControlLoop]:
    """A running ControlLoop; leaving stops it and then its provisioner (a local one stops its workers).
    ``offload_after_s``: an idle session is offloaded only once it has been quiet that long, because the
    worker cannot refuse an offload that races with the resume that follows a quick pause."""
    io = NatsLoopIO(nats)
    provisioner, retire_grace_s = build_provisioner(settings, io.publish_scale)
    loop = ControlLoop(
        store, build_live_controller(settings), mover, provisioner, io,
        control_period_s=settings.control_period_s, provision_timeout_s=settings.provision_timeout_s,
        retire_grace_s=retire_grace_s, max_gpus=settings.max_gpus, offload_after_s=offload_after_s,
    )
    task: asyncio.Task[None] | None = None
    try:
        if settings.provisioner == "local" and settings.initial_workers > 0:
            ids = await provisioner.scale_out(settings.initial_workers, "initial pool of the local provisioner")
            loop.view.add_pending(ids, len(ids), time.monotonic())
        task = asyncio.create_task(loop.run(), name="control-loop")
        log.info("event=control_loop_started policy=%s provisioner=%s period_s=%s min_gpus=%d max_gpus=%d",
                 settings.policy, settings.provisioner, settings.control_period_s, settings.min_gpus,
                 settings.max_gpus)
        yield loop
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await provisioner.close()
