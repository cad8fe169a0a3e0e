"""The local provisioner: worker processes on this host, started like ``turboserve up`` starts them.

Each worker is ``python -m services.cli worker`` with its own TURBOSERVE_WORKER_ID; removal is SIGTERM, which
lets the worker finish its batch and announce WorkerGone, then a kill if it has not exited within
``stop_timeout_s``. It only stops workers it started, or that an earlier scheduler of the same instance started:
each worker's pid is kept in ``<log_dir>/<worker_id>.pid``. Under a supervisor (``turboserve up``) workers are
not tied to the scheduler's life: a scheduler that crashed and was restarted adopts the ones still running
instead of starting a second pool, and the supervisor stops them when the instance stops. Without one, a worker
dies with the scheduler that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from services.common.processes import process_alive
from services.common.service import SUPERVISOR_PID_ENV
from services.launcher import Child, spawn
from services.scheduler.provisioners import ProvisionerError

log = logging.getLogger("turboserve.scheduler.provisioner")

Spawn = Callable[..., Child]


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
        self._supervised = env.get(SUPERVISOR_PID_ENV, "").isdigit()
        self._adopted = self._adopt()
        indices = [int(w.rsplit("-", 1)[1]) for w in self._adopted if w.rsplit("-", 1)[-1].isdigit()]
        self._next_index = max(indices, default=0) + 1

    @property
    def worker_ids(self) -> tuple[str, ...]:
        return (*self._adopted, *self._children)

    def _pid_file(self, worker_id: str) -> Path:
        return self._log_dir / f"{worker_id}.pid"

    def _adopt(self) -> dict[str, int]:
        """Workers an earlier scheduler of this instance started that still run (their pid files say which)."""
        adopted: dict[str, int] = {}
        for pid_file in sorted(self._log_dir.glob(f"{self._id_prefix}-*.pid")):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text())
                if process_alive(pid):
                    adopted[pid_file.stem] = pid
                    continue
            pid_file.unlink(missing_ok=True)
        if adopted:
            log.info("event=workers_adopted workers=%s", ",".join(adopted))
        return adopted

    async def scale_out(self, count: int, reason: str) -> Sequence[str]:
        """Start ``count`` workers now. Popen runs on the loop's own thread on purpose: the children's
        parent-death signal follows the thread that forked them, and a pool thread may exit."""
        started: list[str] = []
        for _ in range(count):
            worker_id = f"{self._id_prefix}-{self._next_index}"
            self._next_index += 1
            env = {**self._env, "TURBOSERVE_WORKER_ID": worker_id}
            child = self._spawn(worker_id, "worker", env, self._log_dir, die_with_parent=not self._supervised)
            self._children[worker_id] = child
            self._pid_file(worker_id).write_text(str(child.process.pid))
            started.append(worker_id)
        log.info("event=workers_started workers=%s reason=%r", ",".join(started), reason)
        return started

    async def remove(self, worker_id: str, reason: str) -> None:
        child = self._children.pop(worker_id, None)
        pid = self._adopted.pop(worker_id, None)
        if child is None and pid is None:
            raise ProvisionerError(f"worker {worker_id!r} was not started by this provisioner; known: "
                                   f"{sorted(self.worker_ids)}")
        code = await self._stop(child) if child is not None else await self._stop_adopted(worker_id, pid or 0)
        self._pid_file(worker_id).unlink(missing_ok=True)
        log.info("event=worker_stopped worker=%s exit_code=%s reason=%r", worker_id, code, reason)

    async def _stop_adopted(self, worker_id: str, pid: int) -> int | None:
        """Not our child, so no exit code to wait for: SIGTERM, watch it go, kill it at the deadline."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self._stop_timeout_s
        while process_alive(pid):
            if time.monotonic() > deadline:
                log.warning("event=worker_kill worker=%s reason='no exit %.1f s after SIGTERM'", worker_id,
                            self._stop_timeout_s)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                break
            await asyncio.sleep(0.05)
        return None

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

    async def parked(self) -> frozenset[str]:
        """A removed worker's process is stopped: none keeps running."""
        return frozenset()

    async def close(self) -> None:
        """A clean stop of the scheduler stops its workers, adopted ones too."""
        children, self._children = list(self._children.values()), {}
        adopted, self._adopted = dict(self._adopted), {}
        await asyncio.gather(*(self._stop(child) for child in children),
                             *(self._stop_adopted(worker_id, pid) for worker_id, pid in adopted.items()))
        for worker_id in [c.name for c in children] + list(adopted):
            self._pid_file(worker_id).unlink(missing_ok=True)
