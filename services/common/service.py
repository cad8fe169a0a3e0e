"""One skeleton for every service: settings parsed once, resources entered on an AsyncExitStack, a shutdown event
set by SIGTERM/SIGINT, and leaving the stack drains everything in reverse order (STYLE habit 8)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import nats
from nats.aio.client import Client as NatsClient

log = logging.getLogger("turboserve")


def configure_logging(service: str, level: str = "INFO") -> None:
    """One line per event, key=value, so logs grep and parse."""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s level=%(levelname)s service={service} logger=%(name)s %(message)s",
    )


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
    """Run `main(stop_event)` until it returns; returns a process exit code."""
    configure_logging(name)

    async def runner() -> None:
        await main(shutdown_event())

    try:
        asyncio.run(runner())
    except KeyboardInterrupt:
        pass
    return 0
