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
from nats.errors import ConnectionClosedError
from nats.micro.request import Request
from nats.micro.service import Service

from services.common.errors import TurboServeError, UnknownMessageType
from services.common.keyed_tasks import KeyedTasks
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


def answering(service: str, endpoint: Endpoint, log: logging.Logger,
              tasks: KeyedTasks) -> Callable[[Request], Awaitable[None]]:
    """The micro handler of ``endpoint``: decode, then act in a span and always respond, concurrently with other
    sessions' requests and after this session's earlier ones."""

    async def handle(request: Request) -> None:
        try:
            message = decode(request.data, max_bytes=endpoint.max_bytes)
            if endpoint.accepts and not isinstance(message, endpoint.accepts):
                raise UnknownMessageType(f"{message.TYPE!r} is not accepted on {request.subject}")
        except TurboServeError as exc:
            await respond(request, refusal(request, exc))
            return
        session_id = getattr(message, "session_id", None)
        key = session_id if isinstance(session_id, str) else None
        await tasks.submit(key, lambda: act(request, message, key))

    async def act(request: Request, message: Message, session_id: str | None) -> None:
        answer: Message
        attributes = dict(endpoint.span_attributes)
        if session_id is not None:
            attributes["session.id"] = session_id
        try:
            with consumer_span(f"{service}.{message.TYPE}", request.headers, **attributes):
                answer = await endpoint.handler(message)
        except asyncio.CancelledError:
            raise
        except TurboServeError as exc:
            answer = refusal(request, exc)
        except Exception:
            log.exception("event=request_failed subject=%s", request.subject)
            answer = Reply(ok=False, code="internal", detail=f"the {service} failed to handle the request")
        await respond(request, answer)

    def refusal(request: Request, exc: TurboServeError) -> Reply:
        log.info("event=refused subject=%s code=%s detail=%r", request.subject, exc.code, str(exc))
        return Reply(ok=False, code=exc.code, detail=str(exc))

    async def respond(request: Request, answer: Message) -> None:
        try:
            await request.respond(encode(answer))
        except ConnectionClosedError:  # stopping: the caller's deadline answers for us
            log.info("event=answer_dropped subject=%s reason=connection_closed", request.subject)

    return handle


class Serving:
    """A started micro service and the requests it is still answering."""

    def __init__(self, service: Service, tasks: KeyedTasks) -> None:
        self._service = service
        self._tasks = tasks

    async def stop(self, grace_s: float = 2.0) -> None:
        """Take no more requests, give those in flight ``grace_s`` to answer, then cancel the rest."""
        await self._service.stop()
        await self._tasks.close(grace_s)


async def serve(nc: NatsClient, *, service: str, description: str, endpoints: Sequence[Endpoint],
                queue_group: str, log: logging.Logger, tasks: KeyedTasks | None = None) -> Serving:
    """Start a micro service answering ``endpoints`` in ``queue_group``; the caller stops it (``await .stop()``).

    ``tasks`` orders the requests of one session; pass the service's own when other subscriptions of the service
    must keep order with these (the worker's credits)."""
    tasks = tasks if tasks is not None else KeyedTasks(service)
    started = await micro.add_service(nc, name=f"turboserve_{service}", version=SERVICE_VERSION,
                                      description=description, queue_group=queue_group)
    try:
        for endpoint in endpoints:
            await started.add_endpoint(name=endpoint.name, subject=endpoint.subject,
                                       handler=answering(service, endpoint, log, tasks))
    except BaseException:
        await started.stop()
        raise
    await nc.flush()  # the server has every subscription once this returns: the service is answering
    return Serving(started, tasks)
