"""A service that cannot start on its settings says so in one line and exits 2, without a traceback."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.config import ConfigError
from services.common.errors import Unavailable
from services.common.nats_server import free_port
from services.common.service import StartAborted, nats_connection, run_service
from services.gpu_worker.model import MissingCheckpointFile
from services.gpu_worker.model.checkpoint_files import resolve_config
from services.gpu_worker.settings import WorkerSettings


@pytest.fixture(autouse=True)
def root_logging_restored() -> Iterator[None]:
    """run_service points the root logger at this test's captured stderr, which pytest closes after it; left
    there, every later record (pgserver's at exit, among them) fails with 'I/O operation on closed file'."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_config_error_at_start_is_one_line_and_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    async def main(_: asyncio.Event) -> None:
        raise ConfigError("TURBOSERVE_MAX_BATCH='abc' is not an integer")

    assert run_service("probe", main) == 2
    err = capsys.readouterr().err
    assert err.strip() == "turboserve probe: TURBOSERVE_MAX_BATCH='abc' is not an integer"


@pytest.mark.parametrize(("name", "value", "says"), [
    ("TURBOSERVE_CAPACITY_FROM", "guess", "not one of measure, setting"),
    ("TURBOSERVE_WORKER_CAPACITY", "0", "out of bounds"),
])
def test_a_bad_worker_setting_is_a_config_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, says: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"{name}.*{says}"):
        WorkerSettings.from_env()
    monkeypatch.setenv("TURBOSERVE_CAPACITY_FROM", "setting")
    monkeypatch.delenv("TURBOSERVE_WORKER_CAPACITY", raising=False)
    assert not WorkerSettings.from_env().capacity_measured


def test_an_unusable_model_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        resolve_config(tmp_path / "missing")
    assert isinstance(raised.value, MissingCheckpointFile) and "does not exist" in str(raised.value)


async def test_an_unreachable_nats_is_unavailable_naming_its_address_after_a_bounded_wait() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(Unavailable, match=url):
        async with nats_connection(url, "probe", first_connect_s=1.0):
            pass
    assert time.monotonic() - started < 5.0


async def test_a_stop_while_still_connecting_ends_the_wait_at_once() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.3, stop.set)
    started = time.monotonic()
    with pytest.raises(StartAborted):
        async with nats_connection(f"nats://127.0.0.1:{free_port()}", "probe", stop, first_connect_s=30.0):
            pass
    assert time.monotonic() - started < 3.0


def test_a_service_whose_dependency_is_missing_at_start_exits_1_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def main(_: asyncio.Event) -> None:
        raise Unavailable("cannot reach NATS at nats://127.0.0.1:1 within 1 s (set NATS_URL)")

    assert run_service("probe", main) == 1
    assert capsys.readouterr().err.strip() == (
        "turboserve probe: cannot reach NATS at nats://127.0.0.1:1 within 1 s (set NATS_URL)")
