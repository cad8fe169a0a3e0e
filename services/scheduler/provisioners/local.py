"""The local provisioner: worker processes on this host, started like ``turboserve up`` starts them.

Each worker is ``python -m services.cli worker`` with its own TURBOSERVE_WORKER_ID (launcher.spawn, so it dies
with the scheduler); removal is SIGTERM, which lets the worker finish its batch and announce WorkerGone, then a
kill if it has not exited within ``stop_timeout_s``. It only stops workers it started.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from services.launcher import Child, spawn
from services.scheduler.provisioners import ProvisionerError

log = logging.getLogger("turboserve.scheduler.provisioner")

Spawn = Callable[[str, str, dict[str, str], Path], Child]


class LocalProcessProvisioner:
    """Owns the worker processes it started; ``close`` stops every one still running (idempotent)."""

    def __init__(
        self,
        env: dict[str, str],
        log_dir: Path,
        *,
        id_prefix: str = "worker",
        stop_timeout_s: float = 10.0,
        spawn_worker: Spawn = spawn,
    ) -> None:
        self._env = env
        self._log_dir = log_dir
        self._id_prefix = id_prefix
        self._stop_timeout_s = stop_timeout_s
        self._spawn = spawn_worker
        self._children: dict[str, Child] = {}
        self._next_index = 1

    @property
    def worker_ids(self) -> tuple[str, ...]:
        return tuple(self._children)

    async def scale_out(self, count: int, reason: str) -> Sequence[str]:
        """Start ``count`` workers now. Popen runs on the loop's own thread on purpose: the children's
        parent-death signal follows the thread that forked them, and a pool thread may exit."""
        started: list[str] = []
        for _ in range(count):
            worker_id = f"{self._id_prefix}-{self._next_index}"
            self._next_index += 1
            env = {**self._env, "TURBOSERVE_WORKER_ID": worker_id}
            self._children[worker_id] = self._spawn(worker_id, "worker", env, self._log_dir)
            started.append(worker_id)
        log.info("event=workers_started workers=%s reason=%r", ",".join(started), reason)
        return started

    async def remove(self, worker_id: str, reason: str) -> None:
        child = self._children.pop(worker_id, None)
        if child is None:
            raise ProvisionerError(f"worker {worker_id!r} was not started by this provisioner; known: "
                                   f"{sorted(self._children)}")
        code = await self._stop(child)
        log.info("event=worker_stopped worker=%s exit_code=%s reason=%r", worker_id, code, reason)

    async def _stop(self, child: Child) -> int:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(child.process.wait, self._stop_timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("event=worker_kill worker=%s reason='no exit %.1f s after SIGTERM'", child.name,
                        self._stop_timeout_s)
            child.process.kill()
            return await asyncio.to_thread(child.process.wait)

    async def close(self) -> None:
        children, self._children = list(self._children.values()), {}
        await asyncio.gather(*(self._stop(child) for child in children))
