"""One skeleton for every service: settings parsed once, resources entered on an AsyncExitStack, a shutdown event
set by SIGTERM/SIGINT, and leaving the stack drains everything in reverse order (STYLE habit 8)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import nats
from nats.aio.client import Client as NatsClient

from services.common import event_loop
from services.common.config import ConfigError
from services.common.errors import Unavailable
from services.common.processes import process_alive
from services.common.telemetry.logs import configure_logging
from services.common.telemetry.metrics import metrics_endpoint
from services.common.telemetry.tracing import tracing_from_env

log = logging.getLogger("turboserve")


class StartAborted(Exception):
    """SIGTERM or SIGINT arrived while the service was still starting: leave quietly."""


async def _log_nats_error(exc: Exception) -> None:
    log.warning("event=nats_error detail=%s", exc or type(exc).__name__)


def nats_servers(url: str) -> list[str]:
    """``NATS_URL`` may name several servers of a cluster, comma-separated: the client fails over between them."""
    return [part.strip() for part in url.split(",") if part.strip()]


@contextlib.asynccontextmanager
async def nats_connection(url: str, name: str, stop: asyncio.Event | None = None, *,
                          first_connect_s: float = 30.0) -> AsyncIterator[NatsClient]:
    """Connect, then reconnect without bound (a restarting server is not fatal) and drain on exit.

    The first connection is bounded: a server that cannot be reached within ``first_connect_s`` is an
    ``Unavailable`` naming the address, and a stop (SIGTERM) while still connecting ends the wait at once.
    """
    connecting = asyncio.ensure_future(nats.connect(
        nats_servers(url), name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.2, connect_timeout=5,
        error_cb=_log_nats_error,
    ))
    stopping = asyncio.ensure_future(stop.wait()) if stop is not None else None
    await asyncio.wait([f for f in (connecting, stopping) if f is not None], timeout=first_connect_s,
                       return_when=asyncio.FIRST_COMPLETED)
    if stopping is not None:
        stopping.cancel()
    if not connecting.done():
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        if stop is not None and stop.is_set():
            raise StartAborted(f"stopped while connecting to NATS at {url}")
        raise Unavailable(f"cannot reach NATS at {url} within {first_connect_s:g} s (set NATS_URL)")
    client = connecting.result()
    try:
        yield client
    finally:
        if not client.is_closed:
            with contextlib.suppress(Exception):
                await client.drain()


SUPERVISOR_PID_ENV = "TURBOSERVE_SUPERVISOR_PID"
"""Set by ``turboserve up`` for every process of its instance: they stop when that process is gone."""
SUPERVISOR_CHECK_S = 1.0
_watchers: set[asyncio.Task[None]] = set()


def shutdown_event() -> asyncio.Event:
    """An event set on SIGTERM or SIGINT, so `main` can wait on it and then unwind its exit stack; also set when
    the supervisor named by ``TURBOSERVE_SUPERVISOR_PID`` is gone (even killed with -9), so no service of a
    dead instance keeps running."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    supervisor = os.environ.get(SUPERVISOR_PID_ENV, "")
    if supervisor.isdigit():
        watcher = asyncio.create_task(_stop_when_gone(int(supervisor), event), name="supervisor-watch")
        _watchers.add(watcher)
        watcher.add_done_callback(_watchers.discard)
    return event


async def _stop_when_gone(pid: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if not process_alive(pid):
            log.warning("event=supervisor_gone pid=%d reason='the instance this service belongs to stopped'", pid)
            stop.set()
            return
        await asyncio.sleep(SUPERVISOR_CHECK_S)


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
    except Unavailable as exc:  # a dependency that is not there at start: say which, let the supervisor retry
        print(f"turboserve {name}: {exc}", file=sys.stderr)
        return 1
    except StartAborted:
        return 0
    return 0
