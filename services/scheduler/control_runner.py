"""The control loop's lifetime: the initial pool a local provisioner starts, and the task that runs the loop until
the scheduler stops. What it sends (placements, drains, scale decisions) goes through the runner's ``ScaleIO``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from services.common.control import ScaleDecision
from services.common.errors import TurboServeError
from services.scheduler.actuation import StateMover
from services.scheduler.control_loop import ControlLoop, LoopIO
from services.scheduler.control_settings import ControlSettings, build_live_controller, build_provisioner
from services.scheduler.liveness import WorkerLiveness
from services.scheduler.provisioners.local import LocalProcessProvisioner
from services.scheduler.store.protocol import SchedulerStore

log = logging.getLogger("turboserve.scheduler.control")
KEEP_LEARNT_TIMEOUT_S = 5.0


class ScaleIO(LoopIO, Protocol):
    """What the loop sends, plus where an external provisioner's scale decisions go."""

    async def publish_scale(self, decision: ScaleDecision) -> None: ...


@contextlib.asynccontextmanager
async def open_control_loop(
    settings: ControlSettings, io: ScaleIO, store: SchedulerStore, mover: StateMover, liveness: WorkerLiveness, *,
    offload_after_s: float, linger_s: float = 60.0, confirm_lead: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[ControlLoop]:
    """A running ControlLoop; leaving stops it and then its provisioner (a local one stops its workers).
    ``offload_after_s``: an idle session is offloaded only once it has been quiet that long, because the
    worker cannot refuse an offload that races with the resume that follows a quick pause."""
    provisioner, retire_grace_s = build_provisioner(settings, io.publish_scale)
    loop = ControlLoop(
        store, build_live_controller(settings), mover, provisioner, io, liveness,
        control_period_s=settings.control_period_s, provision_timeout_s=settings.provision_timeout_s,
        retire_grace_s=retire_grace_s, max_gpus=settings.max_gpus, offload_after_s=offload_after_s, linger_s=linger_s,
        confirm_lead=confirm_lead,
    )
    task: asyncio.Task[None] | None = None
    try:
        await loop.recover()
        if isinstance(provisioner, LocalProcessProvisioner):  # less the workers a crashed scheduler left running
            missing = settings.initial_workers - len(provisioner.worker_ids)
            if missing > 0:
                ids = await provisioner.scale_out(missing, "initial pool of the local provisioner")
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
            with contextlib.suppress(TurboServeError, TimeoutError):  # a crash keeps what the last period kept
                async with asyncio.timeout(KEEP_LEARNT_TIMEOUT_S):
                    if confirm_lead is not None:  # a deposed scheduler leaves what is learnt to the one leading
                        await confirm_lead()
                    await loop.keep_learnt()
        await provisioner.close()
