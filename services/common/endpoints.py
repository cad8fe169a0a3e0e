"""Every request/reply endpoint of every service, on one skeleton over ``nats.micro``.

Decode with the shared codec, call a typed handler inside a consumer span linked to the sender's, and always
answer: the handler's message, a ``Reply`` carrying the code of the documented error it raised, or ``internal``
for anything else (a bug of ours, logged once with the trace id). A caller therefore never waits out its timeout
because a handler failed, and ``nats.micro`` adds discovery and per-endpoint stats (``$SRV.*``) for free.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar, cast

from nats import micro
from nats.aio.client import Client as NatsClient
from nats.micro.request import Request
from nats.micro.service import Service

from services.common.errors import TurboServeError, UnknownMessageType
from services.common.messages import Reply
from services.common.telemetry.tracing import consumer_span
from services.common.wire import DEFAULT_MAX_BYTES, Message, decode, encode

SERVICE_VERSION = "1.0.0"
"""Version every TurboServe micro service announces; the wire messages carry their own."""

Handler = Callable[[Message], Awaitable[Message]]
M = TypeVar("M", bound=Message)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One request subject: what it accepts and who answers it."""

    name: str
    subject: str
    handler: Handler
    accepts: tuple[type[Message], ...] = ()
    """Message types the handler takes; empty means any, the handler refusing what it does not know."""
    max_bytes: int = DEFAULT_MAX_BYTES
    span_attributes: dict[str, str | float] = field(default_factory=dict)

    @classmethod
    def typed(cls, name: str, subject: str, accepts: type[M], handler: Callable[[M], Awaitable[Message]],
              max_bytes: int = DEFAULT_MAX_BYTES) -> Endpoint:
        """An endpoint taking one message type, its handler typed for it."""

        async def call(message: Message) -> Message:
            return await handler(cast(M, message))

        return cls(name, subject, call, (accepts,), max_bytes)


def answering(service: str, endpoint: Endpoint, log: logging.Logger) -> Callable[[Request], Awaitable[None]]:
    """The micro handler of ``endpoint``: decode, act in a span, and always respond."""

    async def handle(request: Request) -> None:
        answer: Message
        try:
            message = decode(request.data, max_bytes=endpoint.max_bytes)
            if endpoint.accepts and not isinstance(message, endpoint.accepts):
                raise UnknownMessageType(f"{message.TYPE!r} is not accepted on {request.subject}")
            attributes = dict(endpoint.span_attributes)
            session_id = getattr(message, "session_id", None)
            if isinstance(session_id, str):
                attributes["session.id"] = session_id
            with consumer_span(f"{service}.{message.TYPE}", request.headers, **attributes):
                answer = await endpoint.handler(message)
        except asyncio.CancelledError:
            raise
        except TurboServeError as exc:
            log.info("event=refused subject=%s code=%s detail=%r", request.subject, exc.code, str(exc))
            answer = Reply(ok=False, code=exc.code, detail=str(exc))
        except Exception:
            log.exception("event=request_failed subject=%s", request.subject)
            answer = Reply(ok=False, code="internal", detail=f"the {service} failed to handle the request")
        await request.respond(encode(answer))

    return handle


async def serve(nc: NatsClient, *, service: str, description: str, endpoints: Sequence[Endpoint],
                queue_group: str, log: logging.Logger) -> Service:
    """Start a micro service answering ``endpoints`` in ``queue_group``; the caller stops it (``await .stop()``)."""
    started = await micro.add_service(nc, name=f"turboserve_{service}", version=SERVICE_VERSION,
                                      description=description, queue_group=queue_group)
    try:
        for endpoint in endpoints:
            await started.add_endpoint(name=endpoint.name, subject=endpoint.subject,
                                       handler=answering(service, endpoint, log))
    except BaseException:
        await started.stop()
        raise
    await nc.flush()  # the server has every subscription once this returns: the service is answering
    return started
