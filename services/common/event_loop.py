"""Which asyncio event loop every process runs: uvloop where it is installed, the standard loop otherwise.

A chunk crosses three event loops (worker, gateway, client) and the NATS server between the end of its encoding and
the viewer, and on a busy host each loop's per-message cost and wake-up show in the tail of the chunk latency.
uvloop (libuv underneath, the loop uvicorn and Sanic run on) does the same asyncio work with less Python in the
path; ``bench/event_loop.py`` measures the difference. ``TURBOSERVE_EVENT_LOOP`` picks:

* ``auto`` (default): uvloop when it imports, else asyncio's own loop, so a platform without uvloop (Windows)
  still runs everything.
* ``uvloop``: uvloop, and an error if it is not installed, so a forced choice never degrades silently.
* ``asyncio``: the standard loop, to compare against or to rule uvloop out when debugging.
"""

from __future__ import annotations

import asyncio
import enum
import importlib.util
import os
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from services.common.config import ConfigError

EVENT_LOOP_ENV = "TURBOSERVE_EVENT_LOOP"
T = TypeVar("T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


class EventLoopKind(enum.StrEnum):
    """The values ``TURBOSERVE_EVENT_LOOP`` accepts."""

    AUTO = "auto"
    UVLOOP = "uvloop"
    ASYNCIO = "asyncio"


def requested_kind(environ: Mapping[str, str] = os.environ) -> EventLoopKind:
    """The loop ``TURBOSERVE_EVENT_LOOP`` asks for; unset or empty means ``auto``."""
    raw = environ.get(EVENT_LOOP_ENV, "").strip().lower() or EventLoopKind.AUTO.value
    try:
        return EventLoopKind(raw)
    except ValueError:
        known = ", ".join(kind.value for kind in EventLoopKind)
        raise ConfigError(f"{EVENT_LOOP_ENV}={raw!r} is not one of: {known}") from None


def loop_factory(environ: Mapping[str, str] = os.environ) -> LoopFactory | None:
    """The factory ``asyncio.Runner`` should build its loop with; None means asyncio's default loop."""
    kind = requested_kind(environ)
    if kind is EventLoopKind.ASYNCIO:
        return None
    if importlib.util.find_spec("uvloop") is None:
        if kind is EventLoopKind.UVLOOP:
            raise ConfigError(f"{EVENT_LOOP_ENV}=uvloop but the uvloop package is not installed")
        return None
    import uvloop

    factory: LoopFactory = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the loop ``TURBOSERVE_EVENT_LOOP`` selects."""
    try:
        factory = loop_factory()
    except ConfigError:
        main.close()  # never awaited: close it so Python does not warn about it on top of the real error
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
