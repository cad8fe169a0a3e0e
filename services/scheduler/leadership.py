"""Leadership: one scheduler decides, any others stand by and take over when it ends.

The decider holds a session-level PostgreSQL advisory lock on a connection of its own. The lock lives exactly as
long as that connection, so PostgreSQL is the arbiter and no lease time or clock is trusted: a killed process
releases it at once (its socket closes), a vanished host once the server's keepalives give up on it (set short on
this connection). A standby asks for the lock every ``poll_s`` and subscribes to nothing until it holds it.

The holder confirms before each decision that its connection still answers. When it does not (PostgreSQL
restarted, the network dropped), the lock may be gone: the holder takes it again on a new connection if it is
free (nobody decided meanwhile: every decision needs PostgreSQL), and the round fails as unavailable while
PostgreSQL cannot be reached, as any store call would. If another scheduler holds it by then, this one has been
deposed: ``lost`` is set, and the scheduler exits (crash-only: its supervisor starts it again, as a standby).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

import psycopg

from services.common.config import libpq_url
from services.common.errors import Unavailable
from services.common.telemetry.metrics import LEADING

log = logging.getLogger("turboserve.scheduler.leadership")

LEADER_LOCK_KEY = 0x7475_7262_6F6C  # any constant shared by every scheduler, other than the migration lock's
SERVER_KEEPALIVE = ("SET tcp_keepalives_idle = 5", "SET tcp_keepalives_interval = 2", "SET tcp_keepalives_count = 3")
"""How soon the server gives up on a holder whose host vanished without closing its socket: about 11 s, where the
system default can be two hours."""

_UNREACHABLE = (psycopg.Error, OSError, TimeoutError)


class LeadershipLost(Unavailable):
    """Another scheduler holds the lead: this one must stop deciding, and exits."""

    code = "leadership_lost"


class Leadership:
    """The scheduler's claim to be the one decider (the module says how it is kept)."""

    def __init__(self, database_url: str, *, poll_s: float = 1.0, timeout_s: float = 5.0) -> None:
        self._conninfo = libpq_url(database_url)
        self._poll_s = poll_s
        self._timeout_s = timeout_s
        self._connection: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        self._holds = False
        self.lost = asyncio.Event()

    async def _query(self, sql: str, *params: object) -> object:
        """One statement on the lock's connection (opened when there is none), within the deadline; a failure
        closes the connection, since the lock it held, if any, may be gone with it."""
        try:
            async with asyncio.timeout(self._timeout_s):
                if self._connection is None or self._connection.closed:
                    self._holds = False
                    self._connection = await psycopg.AsyncConnection.connect(
                        self._conninfo, autocommit=True, connect_timeout=math.ceil(self._timeout_s))
                    for setting in SERVER_KEEPALIVE:
                        await self._connection.execute(setting)
                row = await (await self._connection.execute(sql, params)).fetchone()
        except _UNREACHABLE:
            await self._drop()
            raise
        return None if row is None else row[0]

    async def _drop(self) -> None:
        connection, self._connection, self._holds = self._connection, None, False
        if connection is not None:
            with contextlib.suppress(*_UNREACHABLE):
                async with asyncio.timeout(self._timeout_s):
                    await connection.close()

    async def _try_lock(self) -> bool:
        self._holds = await self._query("SELECT pg_try_advisory_lock(%s)", LEADER_LOCK_KEY) is True
        return self._holds

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Stand by until this process holds the lead (True), or until ``stop`` (False)."""
        said = False
        while not stop.is_set():
            try:
                if await self._try_lock():
                    log.info("event=leading")
                    LEADING.set(1)
                    return True
                if not said:
                    log.info("event=standing_by reason='another scheduler leads; polling every %g s'", self._poll_s)
                    said = True
            except _UNREACHABLE as exc:
                log.warning("event=standby_poll_failed detail=%s", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_s):
                    await stop.wait()
        return False

    async def confirm(self) -> None:
        """Before a decision: raises Unavailable while PostgreSQL cannot show this process still leads, and
        LeadershipLost (with ``lost`` set) once another scheduler does."""
        if self.lost.is_set():
            raise LeadershipLost("this scheduler was deposed")
        try:
            if self._holds:
                with contextlib.suppress(*_UNREACHABLE):
                    await self._query("SELECT 1")
                    return
            if await self._try_lock():
                log.warning("event=leadership_retaken reason='the lock connection was lost and nobody took the lead'")
                return
        except _UNREACHABLE as exc:
            raise Unavailable(f"cannot confirm the lead: PostgreSQL does not answer ({exc})") from exc
        self.lost.set()
        LEADING.set(0)
        log.error("event=leadership_lost reason='another scheduler took the lead while this one's connection was down'")
        raise LeadershipLost("another scheduler took the lead while this one's connection to PostgreSQL was down")

    async def close(self) -> None:
        """Give the lead up (closing the connection releases the lock)."""
        if self._holds:
            LEADING.set(0)
        await self._drop()
