"""One WebSocket client: parse each message, dispatch it to the hub, answer; one writer task per driven session.

Every bad input is answered with an ``error`` message and the connection stays usable; only a slow consumer
(close 1013) or a frame beyond the transport limit (close 1009, from websockets) ends it. The client's messages
are handled one at a time, in order; chunk frames flow concurrently from the writers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from collections.abc import Coroutine

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from services.common.client_messages import (
    ClientMessage,
    Close,
    ListOwnSessions,
    Pause,
    Played,
    Resume,
    SetPrompt,
    Start,
    parse_client_message,
    server_message,
)
from services.common.errors import InvalidField, MessageTooLarge, TurboServeError, client_code
from services.common.telemetry.metrics import WEBSOCKET_CONNECTIONS
from services.gateway.hub import SessionHub
from services.gateway.outgoing import SlowConsumer
from services.gateway.session import GatewaySession

log = logging.getLogger("turboserve.gateway.connection")

_connection_ids = itertools.count(1)
NOTICE_SEND_TIMEOUT_S = 1.0
"""How long a last notice to a client that is not reading may take before we close anyway."""


def state_message(session: GatewaySession, reason: str, next_seq: int | None = None) -> str:
    """``next_seq`` is where a pause stops the stream; otherwise the next chunk the client gets: the oldest one
    waiting for the socket, else the next one to arrive."""
    if next_seq is None:
        waiting = session.outgoing.first_seq()
        next_seq = session.fence.next_seq if waiting is None else waiting
    return server_message(
        "state", session_id=session.session_id, status=session.status, epoch=session.epoch,
        worker_id=session.worker_id, next_seq=next_seq, reason=reason,
    )


def error_message(error: TurboServeError, request: str | None, session_id: str | None) -> str:
    return server_message("error", code=client_code(error.code), message=str(error), request=request,
                          session_id=session_id)


class ClientConnection:
    """Drives the sessions of one WebSocket; implements SessionListener for the sessions it drives."""

    def __init__(self, ws: ServerConnection, owner: str, hub: SessionHub) -> None:
        self.ws = ws
        self.owner = owner
        self.hub = hub
        self.connection_id = next(_connection_ids)
        self._writers: dict[str, asyncio.Task[None]] = {}
        self._notices: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Serve until the client goes; then stop the writers and let the sessions linger."""
        WEBSOCKET_CONNECTIONS.inc()
        try:
            async for data in self.ws:
                await self._handle(data)
        except ConnectionClosed:
            pass
        finally:
            tasks = [*self._writers.values(), *self._notices]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._writers.clear()
            WEBSOCKET_CONNECTIONS.dec()
            await self.hub.release_connection(self.connection_id, self)

    # --- requests ------------------------------------------------------------------------------------------

    async def _handle(self, data: str | bytes) -> None:
        msg: ClientMessage | None = None
        try:
            msg = self._parse(data)
            await self._dispatch(msg)
        except TurboServeError as exc:
            await self._send_error(exc, msg)
        except ConnectionClosed:
            raise
        except Exception as exc:  # a bug of ours must cost this request, not the connection
            log.exception("connection=%d failed on %s", self.connection_id, msg.TYPE if msg else "a message")
            await self._send_error(TurboServeError(f"internal error ({type(exc).__name__}); no effect"), msg)

    async def _send_error(self, error: TurboServeError, msg: ClientMessage | None) -> None:
        request = msg.TYPE if msg is not None else getattr(error, "request_type", None)
        await self._send(error_message(error, request, getattr(msg, "session_id", None)))

    def _parse(self, data: str | bytes) -> ClientMessage:
        size_bytes = len(data.encode() if isinstance(data, str) else data)
        limit_bytes = self.hub.settings.max_message_bytes
        if size_bytes > limit_bytes:
            raise MessageTooLarge(f"message of {size_bytes} bytes exceeds the limit of {limit_bytes} bytes")
        msg = parse_client_message(data)
        limit_chars = self.hub.settings.max_prompt_chars
        if isinstance(msg, (Start, SetPrompt)) and len(msg.prompt) > limit_chars:
            raise InvalidField(f"prompt of {len(msg.prompt)} characters exceeds the limit of {limit_chars}")
        return msg

    async def _dispatch(self, msg: ClientMessage) -> None:
        match msg:
            case Start():
                await self._start(msg)
            case SetPrompt(session_id=session_id, prompt=prompt):
                session = self.hub.get(self.owner, session_id, self.connection_id)
                from_seq = await session.change_prompt(prompt)
                await self._send(server_message("prompt_set", session_id=session_id, from_seq=from_seq))
            case Pause(session_id=session_id):
                session = self.hub.get(self.owner, session_id, self.connection_id)
                stops_at_seq = await session.pause()
                await self._send(state_message(session, "paused", stops_at_seq))
            case Resume(session_id=session_id, next_seq=next_seq):
                session = await self.hub.adopt(self.owner, session_id, self.connection_id, next_seq)
                if next_seq is not None:
                    session.rewind_to(next_seq)
                session.listener = self
                await session.resume()
                await self._send(state_message(session, "resumed"))
                self._drive(session)  # after the answer: no chunk the resume brings comes before it
            case Played(session_id=session_id, seq=seq):
                await self.hub.get(self.owner, session_id, self.connection_id).played(seq)
            case Close(session_id=session_id):
                session = await self.hub.adopt(self.owner, session_id, self.connection_id)
                await self._stop_writer(session_id)
                await self.hub.close(session)
                await self._send(server_message("closed", session_id=session_id, reason="client"))
            case ListOwnSessions():
                listed = await self.hub.list_sessions(self.owner)
                await self._send(server_message(
                    "sessions", sessions=[dataclasses.asdict(s) for s in listed.sessions], more=listed.more,
                ))

    async def _start(self, start: Start) -> None:
        session = await self.hub.start(self.owner, self.connection_id, start)
        hub = self.hub
        await self._send(server_message(
            "started", session_id=session.session_id, epoch=session.epoch, worker_id=session.worker_id,
            model=hub.settings.model, width=hub.settings.frame_width_px, height=hub.settings.frame_height_px,
            fps=hub.settings.playback_fps, credit_chunks=hub.settings.credit_chunks,
        ))
        self._drive(session)

    # --- chunk writers -------------------------------------------------------------------------------------

    def _drive(self, session: GatewaySession) -> None:
        """Become the session's listener and start forwarding its chunks (once)."""
        session.listener = self
        if session.session_id not in self._writers:
            self._writers[session.session_id] = asyncio.create_task(self._write_chunks(session))

    async def _write_chunks(self, session: GatewaySession) -> None:
        try:
            while True:
                chunk = await session.outgoing.head()
                await self.ws.send(chunk.frame)
                session.outgoing.pop(chunk)
                session.traces.delivered(chunk.seq)
        except ConnectionClosed:
            return

    async def _stop_writer(self, session_id: str) -> None:
        writer = self._writers.pop(session_id, None)
        if writer is not None:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    # --- SessionListener -----------------------------------------------------------------------------------

    def session_moved(self, session: GatewaySession) -> None:
        self._notify(self._send(state_message(session, "moved")))

    def session_failed(self, session: GatewaySession, error: TurboServeError) -> None:
        self._notify(self._send(error_message(error, None, session.session_id)))

    def session_overflowed(self, session: GatewaySession, error: SlowConsumer) -> None:
        self._notify(self._close_slow_consumer(session, error))

    async def _close_slow_consumer(self, session: GatewaySession, error: SlowConsumer) -> None:
        try:
            await asyncio.wait_for(self._send(error_message(error, None, session.session_id)), NOTICE_SEND_TIMEOUT_S)
        except TimeoutError:
            log.info("connection=%d too slow even for the slow_consumer notice", self.connection_id)
        await self.ws.close(CloseCode.TRY_AGAIN_LATER, "slow consumer: chunks queued beyond the limit")

    def _notify(self, work: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(work)
        self._notices.add(task)
        task.add_done_callback(self._notices.discard)

    async def _send(self, text: str) -> None:
        try:
            await self.ws.send(text)
        except ConnectionClosed:
            log.debug("connection=%d closed before a reply could be sent", self.connection_id)
