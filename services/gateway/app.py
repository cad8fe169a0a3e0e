"""The gateway's entry: HTTP routes on the WebSocket port (viewer, health, 401), the server, and ``main``.

Auth happens on the handshake, before any WebSocket exists: a request to ``/ws`` without a valid token gets
HTTP 401 and never reaches the session code.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlsplit

from nats.aio.client import Client as NatsClient
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from services.gateway.auth import presented_token
from services.gateway.connection import ClientConnection
from services.gateway.hub import SessionHub
from services.gateway.settings import GatewaySettings

log = logging.getLogger("turboserve.gateway")

WEBSOCKET_PATH = "/ws"
TRANSPORT_MAX_FRAME_FACTOR = 16
"""Frames up to this many times max_message_bytes get a polite message_too_large; beyond it websockets closes 1009."""


@dataclass(frozen=True, slots=True)
class RunningGateway:
    """A gateway that accepts connections; ``port`` is the bound one (useful with port 0)."""

    host: str
    port: int
    hub: SessionHub

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def ws_url(self, token: str) -> str:
        return f"ws://{self.host}:{self.port}{WEBSOCKET_PATH}?token={token}"


def _response(status: http.HTTPStatus, body: bytes, content_type: str, **extra: str) -> Response:
    headers = Headers({"Content-Type": content_type, "Content-Length": str(len(body)), "Cache-Control": "no-store"})
    for name, value in extra.items():
        headers[name.replace("_", "-")] = value
    return Response(status.value, status.phrase, headers, body)


class GatewayRoutes:
    """What the gateway answers over plain HTTP, and who may open a WebSocket."""

    def __init__(self, hub: SessionHub, nats: NatsClient) -> None:
        self.hub = hub
        self.nats = nats
        self.viewer_html = resources.files("services.gateway").joinpath("viewer.html").read_bytes()

    def owner_of(self, request: Request) -> str | None:
        token = presented_token(request.path, request.headers.get("Authorization"))
        return self.hub.settings.tokens.owner_of(token)

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == WEBSOCKET_PATH:
            if self.owner_of(request) is None:
                return _response(
                    http.HTTPStatus.UNAUTHORIZED, b"missing or invalid token\n", "text/plain; charset=utf-8",
                    WWW_Authenticate='Bearer realm="turboserve"',
                )
            return None
        if path in ("/", "/index.html"):
            return _response(http.HTTPStatus.OK, self.viewer_html, "text/html; charset=utf-8")
        if path == "/healthz":
            return self._health()
        if path == "/whoami":  # a browser cannot read a refused handshake's status; the viewer asks here
            owner = self.owner_of(request)
            if owner is None:
                return _response(http.HTTPStatus.UNAUTHORIZED, b'{"error":"missing or invalid token"}',
                                 "application/json", WWW_Authenticate='Bearer realm="turboserve"')
            return _response(http.HTTPStatus.OK, json.dumps({"owner": owner}).encode(), "application/json")
        if path == "/favicon.ico":  # browsers ask on every visit; no icon is not an error
            return _response(http.HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        return _response(http.HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")

    def _health(self) -> Response:
        nats_ok = self.nats.is_connected
        body = json.dumps({
            "status": "ok" if nats_ok else "degraded", "nats_connected": nats_ok,
            "sessions": len(self.hub.registry), "lingering_sessions": self.hub.lingering_count,
            "dropped_chunks": self.hub.dropped_chunks(),
        }).encode()
        status = http.HTTPStatus.OK if nats_ok else http.HTTPStatus.SERVICE_UNAVAILABLE
        return _response(status, body, "application/json")

    async def handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        owner = self.owner_of(ws.request)
        if owner is None:  # process_request already refused it; this guards a future change of routes
            await ws.close(1008, "missing or invalid token")
            return
        await ClientConnection(ws, owner, self.hub).run()


@contextlib.asynccontextmanager
async def running_gateway(settings: GatewaySettings, nats: NatsClient) -> AsyncIterator[RunningGateway]:
    """Serve until the block exits; then close the connections, and after them every session."""
    hub = SessionHub(settings, nats)
    routes = GatewayRoutes(hub, nats)
    leases = asyncio.create_task(hub.renew_leases(), name="gateway-leases")
    try:
        async with serve(
            routes.handle, settings.host, settings.port, process_request=routes.process_request,
            max_size=settings.max_message_bytes * TRANSPORT_MAX_FRAME_FACTOR, max_queue=16,
            write_limit=256 * 1024, compression=None, server_header="turboserve-gateway",
        ) as server:
            port = int(server.sockets[0].getsockname()[1])
            yield RunningGateway(settings.host, port, hub)
    finally:
        leases.cancel()
        await asyncio.gather(leases, return_exceptions=True)
        await hub.aclose()


async def serve_gateway(settings: GatewaySettings, nats: NatsClient, stop: asyncio.Event) -> None:
    """Run the gateway on an existing NATS connection until ``stop`` is set."""
    async with running_gateway(settings, nats) as gateway:
        log.info("gateway listening url=%s", gateway.http_url)
        await stop.wait()
