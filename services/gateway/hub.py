"""All sessions of one gateway: creation, ownership checks, takeovers, leases, and the linger after a drop.

A session belongs to the system, not to this gateway: the scheduler records it with its token's owner, and the
per-token limit is one conditional insert there, whichever gateway asks. A session outlives the connection that
started it: when a connection drops, its sessions pause and linger for ``linger_s``, still owned by the token,
so a reconnecting client resumes them by id, through this gateway or any other (which takes it over); after that
they are closed. This gateway renews the lease of every session it holds; if it dies, the scheduler closes them
once the lease and the linger have run out, unless a client resumed them elsewhere.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import uuid

from nats.aio.client import Client as NatsClient

from services.common import subjects
from services.common.client_messages import Start
from services.common.errors import InvalidField, InvalidState, Unavailable, UnknownSession
from services.common.messages import ClaimSession, GatewayLease, ListSessions, SessionClaim, SessionList
from services.gateway.registry import SessionRegistry
from services.gateway.rpc import PeerRefused, publish, request
from services.gateway.session import (
    GatewaySession,
    SessionLimits,
    SessionListener,
    SessionSpec,
)
from services.gateway.settings import GatewaySettings

log = logging.getLogger("turboserve.gateway.hub")


class SessionHub:
    """Creates, finds, lingers and closes sessions on behalf of the connections."""

    def __init__(self, settings: GatewaySettings, nats: NatsClient) -> None:
        self.settings = settings
        self.registry: SessionRegistry[GatewaySession] = SessionRegistry()
        self._nats = nats
        self._limits = SessionLimits(settings.credit_chunks, settings.queue_chunks, settings.request_timeout_s,
                                     settings.gateway_id, settings.lease_s, settings.max_sessions_per_token,
                                     settings.playback_fps, settings.lead_chunks, settings.paced)
        self._lingering: dict[str, asyncio.Task[None]] = {}
        self._claims = asyncio.Lock()

    @property
    def lingering_count(self) -> int:
        return len(self._lingering)

    def dropped_chunks(self) -> dict[str, int]:
        """Chunks the fences dropped, by reason (duplicate, stale_epoch, ...), over the live sessions."""
        total: collections.Counter[str] = collections.Counter()
        for session in self.registry.sessions():
            total.update(session.dropped)
        return dict(total)

    async def start(self, owner: str, connection_id: int, start: Start) -> GatewaySession:
        """Admit (or refuse with limit_exceeded) and open a new session for ``owner``."""
        served = (self.settings.frame_width_px, self.settings.frame_height_px)
        if (start.width, start.height) not in ((None, None), served):
            raise InvalidField(
                f"size {start.width}x{start.height} is not served; model {self.settings.model!r} renders "
                f"{served[0]}x{served[1]}"
            )
        spec = SessionSpec(uuid.uuid4().hex, owner, start.prompt, start.seed, self.settings.model)
        session = GatewaySession(spec, self._limits, self._nats, handed_over=self._forget)
        self.registry.admit(owner, spec.session_id, session, connection_id)
        try:
            await session.open()
        except BaseException:
            self.registry.remove(spec.session_id)
            raise
        return session

    def get(self, owner: str, session_id: str, connection_id: int) -> GatewaySession:
        return self.registry.get(owner, session_id, connection_id)

    async def adopt(
        self, owner: str, session_id: str, connection_id: int, next_seq: int | None = None
    ) -> GatewaySession:
        """Take over a lingering session of the same token (or keep driving our own); a session this gateway
        does not hold is claimed from the scheduler, at ``next_seq`` when the client says what it holds."""
        async with self._claims:  # two resumes of one session must not both claim it
            if session_id not in self.registry:
                await self._claim(owner, session_id, connection_id, next_seq)
        session = self.registry.adopt(owner, session_id, connection_id)
        timer = self._lingering.pop(session_id, None)
        if timer is not None:
            timer.cancel()
        return session

    async def list_sessions(self, owner: str) -> SessionList:
        """``owner``'s open sessions, through every gateway: the scheduler keeps them, not this process."""
        return await request(self._nats, subjects.SCHED_LIST, ListSessions(owner), SessionList,
                             timeout_s=self.settings.request_timeout_s)

    async def _claim(self, owner: str, session_id: str, connection_id: int, next_seq: int | None) -> None:
        claim = ClaimSession(session_id, owner, self.settings.gateway_id, self.settings.lease_s)
        try:
            record = await request(self._nats, subjects.SCHED_CLAIM, claim, SessionClaim,
                                   timeout_s=self.settings.request_timeout_s)
        except PeerRefused as exc:
            if exc.code == UnknownSession.code:
                raise UnknownSession(f"no session {session_id!r} for this token") from None
            raise
        if record.model != self.settings.model:
            raise InvalidState(f"session {session_id!r} runs model {record.model!r}; this gateway serves "
                               f"{self.settings.model!r}")
        spec = SessionSpec(session_id, owner, record.prompts[0][1], record.seed, record.model)
        session = GatewaySession(spec, self._limits, self._nats, handed_over=self._forget)
        await session.take_over(record, next_seq)
        self.registry.admit(owner, session_id, session, None)
        log.info("session=%s taken over from another gateway", session_id)

    async def renew_leases(self) -> None:
        """Renew the lease of every session this gateway holds, a third of the lease apart, until cancelled; a
        renewal lost to a NATS hiccup is made up by the next one. Each round also re-credits a stream that went
        silent for a whole round (its credit or chunk was lost in flight)."""
        interval_s = self.settings.lease_s / 3
        while True:
            for session in self.registry.sessions():
                await session.refresh_credit(stalled_after_s=interval_s)
            next_seqs = {s.session_id: s.fence.next_seq for s in self.registry.sessions() if s.status != "closed"}
            if next_seqs:
                lease = GatewayLease(self.settings.gateway_id, self.settings.lease_s, next_seqs)
                try:
                    await publish(self._nats, subjects.SCHED_GATEWAY_LEASE, lease)
                except Unavailable as exc:
                    log.warning("event=lease_not_renewed sessions=%d detail=%s", len(next_seqs), exc)
            await asyncio.sleep(interval_s)

    async def close(self, session: GatewaySession, reason: str = "closed by its client") -> None:
        timer = self._lingering.pop(session.session_id, None)
        if timer is not None and timer is not asyncio.current_task():
            timer.cancel()
        await session.close(reason)
        self.registry.remove(session.session_id)

    async def release_connection(self, connection_id: int, listener: SessionListener) -> None:
        """A connection ended: pause its sessions and let them linger for a resume by the same token."""
        detached = self.registry.detach_connection(connection_id)
        for _, session in detached:
            session.forget_listener(listener)
        for session_id, session in detached:
            unclaimed = functools.partial(self.registry.is_detached, session_id)
            await session.suspend(unclaimed)
            if unclaimed() and session_id not in self._lingering:
                self._lingering[session_id] = asyncio.create_task(self._linger(session))

    async def aclose(self) -> None:
        """Gateway shutdown: close every session so no worker keeps state for a client that cannot come back."""
        timers = list(self._lingering.values())
        self._lingering.clear()
        for timer in timers:
            timer.cancel()
        await asyncio.gather(*timers, return_exceptions=True)
        await asyncio.gather(*(self.close(session, "the gateway shut down") for session in self.registry.sessions()),
                             return_exceptions=True)

    def _forget(self, session: GatewaySession) -> None:
        """Another gateway drives ``session`` now: no linger, no lease, no place in this gateway's registry."""
        timer = self._lingering.pop(session.session_id, None)
        if timer is not None:
            timer.cancel()
        self.registry.remove(session.session_id, session)

    async def _linger(self, session: GatewaySession) -> None:
        await asyncio.sleep(self.settings.linger_s)
        reason = f"no connection resumed it within the {self.settings.linger_s:g} s linger"
        log.info("session=%s closed: %s", session.session_id, reason)
        await self.close(session, reason)
