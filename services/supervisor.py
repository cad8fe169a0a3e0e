"""Keep a set of named processes running: a crashed one is restarted after a backoff that doubles while it keeps
crashing, and the log it died with is kept beside the new one. ``turboserve up`` runs its services under this.

The supervisor is also the children's subreaper: a worker started by the scheduler outlives a scheduler crash,
is re-parented here instead of to init, and is reaped and stopped here. Every service of an instance gets
``TURBOSERVE_SUPERVISOR_PID`` and stops itself when the supervisor is gone (even after a ``kill -9`` of it), so
nothing is left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Orphaned descendants (a crashed scheduler's workers) come to this process instead of init."""
    with contextlib.suppress(OSError, AttributeError):
        return bool(ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1) == 0)
    return False


@dataclass
class Program:
    """What to run under a name: a fresh process is started from this after every crash."""

    name: str
    start: Callable[[Path], subprocess.Popen[bytes]]
    """Starts the process with its output going to the given log path."""


@dataclass
class _Running:
    program: Program
    process: subprocess.Popen[bytes] | None
    log_path: Path
    started_s: float
    crashes: int = 0
    restart_at_s: float | None = None
    crash_logs: list[Path] = field(default_factory=list)


class Supervisor:
    """Starts programs, restarts the ones that exit, stops them all in reverse order of start. An exit with a
    code in ``fatal_codes`` (2: the service refused its settings) is not retried: restarting cannot fix it."""

    def __init__(
        self, log_dir: Path, *, min_backoff_s: float = 0.5, max_backoff_s: float = 10.0,
        stable_after_s: float = 30.0, clock: Callable[[], float] = time.monotonic,
        fatal_codes: frozenset[int] = frozenset({2}),
    ) -> None:
        self.log_dir = log_dir
        self._min_backoff_s = min_backoff_s
        self._max_backoff_s = max_backoff_s
        self._stable_after_s = stable_after_s
        self._clock = clock
        self._fatal_codes = fatal_codes
        self._running: dict[str, _Running] = {}
        self._stopped = False
        self.failed: list[tuple[str, int, Path]] = []
        """(name, exit code, log) of programs that exited with a fatal code; they stay down."""

    def add(self, program: Program) -> None:
        log_path = self.log_dir / f"{program.name}.log"
        self._running[program.name] = _Running(program, program.start(log_path), log_path, self._clock())

    def process(self, name: str) -> subprocess.Popen[bytes] | None:
        return self._running[name].process

    @property
    def crash_logs(self) -> list[Path]:
        return [path for running in self._running.values() for path in running.crash_logs]

    def check(self) -> list[str]:
        """Notice exits and restart what is due; returns what happened, one line each, for the console."""
        if self._stopped:
            return []
        events: list[str] = []
        now_s = self._clock()
        for name, running in self._running.items():
            process = running.process
            if process is not None and process.poll() is not None:
                events.append(self._crashed(name, running, process.returncode, now_s))
            elif running.process is None and running.restart_at_s is not None and now_s >= running.restart_at_s:
                running.process = running.program.start(running.log_path)
                running.started_s, running.restart_at_s = now_s, None
                events.append(f"{name} restarted (restart {running.crashes})")
        self._reap_orphans()
        return events

    def _crashed(self, name: str, running: _Running, code: int, now_s: float) -> str:
        if code in self._fatal_codes:
            running.process = None
            self.failed.append((name, code, running.log_path))
            return f"{name} exited with code {code} and is not restarted (its log: {running.log_path})"
        if now_s - running.started_s >= self._stable_after_s:
            running.crashes = 0  # it ran long enough: the next crash starts the backoff afresh
        running.crashes += 1
        backoff_s = min(self._max_backoff_s, self._min_backoff_s * 2 ** (running.crashes - 1))
        kept = running.log_path.with_name(f"{name}.crash-{len(running.crash_logs) + 1}.log")
        with contextlib.suppress(OSError):
            running.log_path.rename(kept)
            running.crash_logs.append(kept)
        running.process, running.restart_at_s = None, now_s + backoff_s
        return f"{name} exited with code {code}; restarting in {backoff_s:g} s (its log: {kept})"

    def _reap_orphans(self) -> None:
        """Collect re-parented descendants that exited, leaving our own children to their Popen objects."""
        ours = {r.process.pid for r in self._running.values() if r.process is not None}
        for pid in orphan_pids(ours):
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM everything in reverse order of start, orphans (workers of a crashed scheduler) too, then kill
        what is still there at the deadline."""
        self._stopped = True
        processes = [r.process for r in reversed(self._running.values()) if r.process is not None]
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        stop_orphans(deadline)


def orphan_pids(excluding: set[int]) -> list[int]:
    """This process's children that no Popen of ours owns: descendants re-parented to us as subreaper."""
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            with contextlib.suppress(OSError):
                pids.extend(int(p) for p in (task / "children").read_text().split())
    return [pid for pid in pids if pid not in excluding]


def stop_orphans(deadline_s: float) -> None:
    pids = orphan_pids(set())
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    for pid in pids:
        while time.monotonic() < deadline_s:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break
            if done:
                break
            time.sleep(0.05)
        else:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
