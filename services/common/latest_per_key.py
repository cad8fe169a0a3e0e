"""Run the newest work of each key, one at a time per key, and drop the stale work waiting behind it.

For reports where each one supersedes the last (a worker's heartbeat states its whole condition), a consumer that
falls behind (a slow database) should catch up to the newest, not work through a backlog that only grows: at most
one piece per key runs and at most one waits, whatever the rate. ``keyed_tasks.KeyedTasks`` is the sibling for
work that must all happen, in order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from services.common.keyed_tasks import finish

log = logging.getLogger("turboserve.latest_per_key")


class LatestPerKey:
    """``submit`` never waits: the work starts now if nothing of its key runs, else it replaces what is waiting."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._waiting: dict[str, Callable[[], Awaitable[None]]] = {}
        self._running: dict[str, asyncio.Task[None]] = {}

    def submit(self, key: str, work: Callable[[], Awaitable[None]]) -> None:
        self._waiting[key] = work
        if key not in self._running:
            self._running[key] = asyncio.create_task(self._drain(key), name=f"{self._name}:{key}")

    async def _drain(self, key: str) -> None:
        try:
            while (work := self._waiting.pop(key, None)) is not None:
                try:
                    await work()
                except Exception:  # work answers its own errors; one that escapes is a bug, said once here
                    log.exception("event=task_failed tasks=%s key=%s", self._name, key)
        finally:  # no await between the last pop and here, so nothing submitted meanwhile is left unrun
            del self._running[key]

    async def close(self, grace_s: float) -> None:
        """Drop what waits, let what runs finish for up to ``grace_s``, then cancel it."""
        self._waiting.clear()
        await finish(set(self._running.values()), grace_s)
