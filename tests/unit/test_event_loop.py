"""The event loop every process runs on: uvloop by default where installed, the standard loop on request."""

from __future__ import annotations

import asyncio
import importlib.util
import warnings

import pytest
import uvloop

from services.common import event_loop
from services.common.config import ConfigError


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_auto_runs_on_uvloop_where_it_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(event_loop.EVENT_LOOP_ENV, raising=False)
    assert event_loop.loop_factory() is uvloop.new_event_loop
    assert event_loop.run(_loop_module()).startswith("uvloop")


def test_asyncio_is_the_standard_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.EVENT_LOOP_ENV, "asyncio")
    assert event_loop.loop_factory() is None
    assert event_loop.run(_loop_module()).startswith("asyncio")


def test_an_unknown_loop_is_a_config_error_and_the_coroutine_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.EVENT_LOOP_ENV, "trio")
    main = _loop_module()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine was never awaited" would be a RuntimeWarning
        with pytest.raises(ConfigError, match="TURBOSERVE_EVENT_LOOP='trio' is not one of: auto, uvloop, asyncio"):
            event_loop.run(main)
    assert main.cr_frame is None  # closed


def test_without_uvloop_auto_falls_back_and_a_forced_uvloop_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "uvloop" else real_find_spec(name, *args))
    assert event_loop.loop_factory({event_loop.EVENT_LOOP_ENV: "auto"}) is None
    with pytest.raises(ConfigError, match="uvloop package is not installed"):
        event_loop.loop_factory({event_loop.EVENT_LOOP_ENV: "uvloop"})
