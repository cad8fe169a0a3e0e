"""The external provisioner: publishes each scaling decision and leaves acting on it to another system."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from services.common.control import ScaleDecision

log = logging.getLogger("turboserve.scheduler.provisioner")

Publish = Callable[[ScaleDecision], Awaitable[None]]


class ExternalProvisioner:
    """Publishes ScaleDecision messages (the runner supplies ``publish``: NATS subject ts.sched.scale).

    It never knows ids in advance, so ``scale_out`` returns none: the control loop counts the workers it asked
    for and takes the next unknown worker that heart-beats as one of them.
    """

    def __init__(self, publish: Publish) -> None:
        self._publish = publish

    async def scale_out(self, count: int, reason: str) -> Sequence[str]:
        await self._publish(ScaleDecision("scale_out", count, reason=reason))
        log.info("event=scale_decision action=scale_out count=%d reason=%r", count, reason)
        return ()

    async def remove(self, worker_id: str, reason: str) -> None:
        await self._publish(ScaleDecision("remove", 1, worker_id, reason))
        log.info("event=scale_decision action=remove worker=%s reason=%r", worker_id, reason)

    async def parked(self) -> frozenset[str]:
        """A removed worker the external system keeps running comes back into the pool when it beats."""
        return frozenset()

    async def close(self) -> None:
        """Nothing held: the workers are the external system's."""
