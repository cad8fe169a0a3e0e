"""Run incoming work concurrently, except that work of the same key (a session) keeps its arrival order.

A nats-py subscription hands its callback one message at a time, so a handler that waits (an attach waiting for
the batch in flight, an open waiting for the next decision) holds up every other session behind it: after a
worker dies, its sessions' attaches on a survivor were served one batch apart, a second and more for the last.
Work for different sessions has nothing to wait for in common; work for one session must still happen in the
order it came (attach before its prompt change), which a task per message alone would not keep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("turboserve.keyed_tasks")


class KeyedTasks:
    """At most ``limit`` pieces of work at once; past that, ``submit`` waits, which slows the subscription as
    before rather than growing a queue without bound."""

    def __init__(self, name: str, limit: int = 256) -> None:
        self._name = name
        self._slots = asyncio.Semaphore(limit)
        self._tails: dict[str, asyncio.Task[None]] = {}
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, key: str | None, work: Callable[[], Awaitable[None]]) -> None:
        """Start ``work`` after the last submitted work of ``key`` ends (at once when ``key`` is None)."""
        await self._slots.acquire()
        previous = self._tails.get(key) if key is not None else None
        task = asyncio.create_task(self._run(key, previous, work), name=f"{self._name}:{key}")
        if key is not None:
            self._tails[key] = task
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, key: str | None, previous: asyncio.Task[None] | None,
                   work: Callable[[], Awaitable[None]]) -> None:
        try:
            if previous is not None:
                await asyncio.wait({previous})  # its outcome is its own; only its end matters here
            await work()
        except Exception:  # work answers its own errors; one that escapes is a bug, said once here
            log.exception("event=task_failed tasks=%s key=%s", self._name, key)
        finally:
            self._slots.release()
            if key is not None and self._tails.get(key) is asyncio.current_task():
                del self._tails[key]

    async def close(self, grace_s: float) -> None:
        """Let work in flight finish for up to ``grace_s``, then cancel what is left."""
        await finish(set(self._running), grace_s)


async def finish(tasks: set[asyncio.Task[None]], grace_s: float) -> None:
    """Let ``tasks`` end for up to ``grace_s``, then cancel what is left and wait for it to go."""
    if tasks:
        await asyncio.wait(tasks, timeout=grace_s)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
