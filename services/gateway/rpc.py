"""NATS request/reply for the gateway: typed answers in, typed errors out, so no caller sees a transport exception.

A peer that does not answer in time or is not there is ``Unavailable`` (retry later); a peer that answers with a
refusal becomes ``PeerRefused`` carrying the peer's own error code, which the client sees unchanged.
"""

from __future__ import annotations

from typing import TypeVar

from nats.aio.client import Client as NatsClient
from nats.errors import ConnectionClosedError

from services.common import requests, subjects
from services.common.errors import TurboServeError, Unavailable
from services.common.messages import Reply
from services.common.telemetry.tracing import inject_current
from services.common.wire import Message, decode, encode

M = TypeVar("M", bound=Message)


class PeerRefused(TurboServeError):
    """The scheduler or a worker answered with an error; ``code`` is the peer's code, passed on to the client."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail or code)
        self.code = code or "internal"


async def request(nats: NatsClient, subject: str, msg: Message, expect: type[M], *, timeout_s: float) -> M:
    """Send ``msg`` and return the answer as ``expect``; a Reply(ok=False) raises PeerRefused. The current
    trace context rides along in the headers (none when tracing is off).

    A request to the scheduler that nobody was subscribed to (its standby taking over, its restart) is sent again
    until ``timeout_s`` (``services.common.requests``); a worker that nobody serves is gone, and that is said at
    once."""
    answer = await requests.request(nats, subject, encode(msg), timeout_s=timeout_s,
                                    resend=subjects.served_by_scheduler(subject), headers=inject_current())
    reply = decode(answer.data)
    if isinstance(reply, Reply):
        if not reply.ok:
            raise PeerRefused(reply.code, reply.detail)
        if expect is Reply:
            return reply  # type: ignore[return-value]
    if not isinstance(reply, expect):
        raise Unavailable(f"{subject} answered {msg.TYPE} with {reply.TYPE}, expected {expect.TYPE}")
    return reply


async def publish(nats: NatsClient, subject: str, msg: Message, headers: dict[str, str] | None = None) -> None:
    """Fire and forget; the receiver fences by epoch, so a lost or late message is harmless."""
    try:
        await nats.publish(subject, encode(msg), headers=headers)
    except ConnectionClosedError:
        raise Unavailable("the gateway's NATS connection is closed") from None
