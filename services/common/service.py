"""One skeleton for every service: settings parsed once, resources entered on an AsyncExitStack, a shutdown event
set by SIGTERM/SIGINT, and leaving the stack drains everything in reverse order (STYLE habit 8)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import nats
from nats.aio.client import Client as NatsClient

from services.common import event_loop
from services.common.config import ConfigError
from services.common.telemetry.logs import configure_logging
from services.common.telemetry.metrics import metrics_endpoint
from services.common.telemetry.tracing import tracing_from_env

log = logging.getLogger("turboserve")


@contextlib.asynccontextmanager
async def nats_connection(url: str, name: str) -> AsyncIterator[NatsClient]:
    """Connect with unbounded reconnects (a restarting server is not fatal) and drain on exit."""
    client = await nats.connect(
        url, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.2, connect_timeout=5
    )
    try:
        yield client
    finally:
        if not client.is_closed:
            with contextlib.suppress(Exception):
                await client.drain()


def shutdown_event() -> asyncio.Event:
    """An event set on SIGTERM or SIGINT, so `main` can wait on it and then unwind its exit stack."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event


def run_service(name: str, main: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run `main(stop_event)` until it returns, with its telemetry (logs, tracing, /metrics) around it;
    returns a process exit code. Tracing is shut down last, so spans of the drain are exported too. A setting the
    service cannot start with (a ``ConfigError``: a bad variable, an unusable model directory) is one line on
    stderr and exit code 2, not a traceback."""
    configure_logging(name)

    async def runner() -> None:
        with tracing_from_env(name), metrics_endpoint(name):
            await main(shutdown_event())

    try:
        event_loop.run(runner())
    except KeyboardInterrupt:
        pass
    except ConfigError as exc:
        print(f"turboserve {name}: {exc}", file=sys.stderr)
        return 2
    return 0
