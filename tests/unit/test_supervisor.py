"""The supervisor restarts a crashed service after a backoff that doubles while it keeps crashing, keeps the log
it died with, leaves a service that refused its settings down, and stops everything it started."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.service import SUPERVISOR_CHECK_S, SUPERVISOR_PID_ENV, shutdown_event
from services.supervisor import Program, Supervisor


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def exits_with(code: int, said: str) -> Program:
    def start(log_path: Path) -> subprocess.Popen[bytes]:
        with log_path.open("ab") as log:
            return subprocess.Popen([sys.executable, "-c", f"print({said!r}); raise SystemExit({code})"],
                                    stdout=log, stderr=subprocess.STDOUT)
    return Program("flaky", start)


def sleeper(name: str) -> Program:
    def start(log_path: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    return Program(name, start)


def settle(supervisor: Supervisor, name: str) -> None:
    process = supervisor.process(name)
    assert process is not None
    process.wait(timeout=30)


def test_a_crashing_service_is_restarted_with_a_doubling_backoff_and_each_crash_log_is_kept(tmp_path: Path) -> None:
    clock = Clock()
    supervisor = Supervisor(tmp_path, min_backoff_s=0.5, max_backoff_s=2.0, stable_after_s=30.0, clock=clock)
    supervisor.add(exits_with(3, "first run"))
    settle(supervisor, "flaky")
    assert supervisor.check() == [f"flaky exited with code 3; restarting in 0.5 s (its log: "
                                  f"{tmp_path / 'flaky.crash-1.log'})"]
    assert supervisor.process("flaky") is None
    clock.now_s = 0.4
    assert supervisor.check() == []  # not yet
    clock.now_s = 0.5
    assert supervisor.check() == ["flaky restarted (restart 1)"]
    settle(supervisor, "flaky")
    assert "restarting in 1 s" in supervisor.check()[0]
    clock.now_s = 1.5
    supervisor.check()
    settle(supervisor, "flaky")
    assert "restarting in 2 s" in supervisor.check()[0]  # capped at max_backoff_s from here on
    assert [p.name for p in supervisor.crash_logs] == ["flaky.crash-1.log", "flaky.crash-2.log", "flaky.crash-3.log"]
    assert (tmp_path / "flaky.crash-1.log").read_text().strip() == "first run"
    supervisor.stop()


def test_a_service_that_ran_for_a_while_starts_its_backoff_afresh(tmp_path: Path) -> None:
    clock = Clock()
    supervisor = Supervisor(tmp_path, min_backoff_s=0.5, stable_after_s=30.0, clock=clock)
    supervisor.add(exits_with(1, "x"))
    settle(supervisor, "flaky")
    supervisor.check()
    clock.now_s = 1.0
    supervisor.check()
    settle(supervisor, "flaky")
    clock.now_s = 100.0  # it ran 99 s before this crash
    assert "restarting in 0.5 s" in supervisor.check()[0]
    supervisor.stop()


def test_a_service_that_refuses_its_settings_is_not_restarted(tmp_path: Path) -> None:
    supervisor = Supervisor(tmp_path, clock=Clock())
    supervisor.add(exits_with(2, "turboserve gateway: TURBOSERVE_TOKENS is not set"))
    settle(supervisor, "flaky")
    assert "is not restarted" in supervisor.check()[0]
    assert supervisor.failed == [("flaky", 2, tmp_path / "flaky.log")]
    assert supervisor.check() == [] and supervisor.process("flaky") is None


def test_stop_ends_every_service_in_reverse_order_and_nothing_restarts_after(tmp_path: Path) -> None:
    supervisor = Supervisor(tmp_path, clock=Clock())
    for name in ("scheduler", "gateway"):
        supervisor.add(sleeper(name))
    processes = [supervisor.process(name) for name in ("scheduler", "gateway")]
    supervisor.stop(timeout_s=5)
    assert all(p is not None and p.poll() is not None for p in processes)
    assert supervisor.check() == []


async def test_a_service_stops_itself_when_its_supervisor_is_gone_even_after_a_kill_9(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    supervisor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setenv(SUPERVISOR_PID_ENV, str(supervisor.pid))
    stop = shutdown_event()
    await asyncio.sleep(SUPERVISOR_CHECK_S * 1.5)
    assert not stop.is_set()
    supervisor.kill()  # a zombie until reaped below: it must count as gone already
    try:
        await asyncio.wait_for(stop.wait(), timeout=SUPERVISOR_CHECK_S * 5)
    finally:
        supervisor.wait()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # give the test runner its own handlers back
            loop.remove_signal_handler(sig)
