"""Exactly once across reconnects: a client whose connection is cut 100 times at random bytes (mid-frame most of
the time, the handshake sometimes), each time through either gateway, resumes with the last seq it holds and
ends with the very bytes an undisturbed run of the same session gets.

The cuts come from a TCP proxy between the client and the gateways that forwards the gateway's bytes up to a
random count and then drops both sides without a close handshake, as a network failure does: whatever the
gateway had written past that point (whole chunks included) never reaches the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from websockets.exceptions import ConnectionClosed, InvalidMessage

from services.client import ReceivedChunk, ServerError, TurboServeClient
from services.common.nats_server import free_port
from tests.e2e.conftest import TOKENS, RunningSystem, receive, running_system, start_when_workers_registered

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CUTS = 100
CHUNKS = 140
PROMPT, SEED = "a paper boat on a river", 77


class CuttingProxy:
    """Listens on a port of its own; each connection goes to a random upstream port and is cut after a random
    number of the upstream's bytes (drawn per connection from ``cut_after``)."""

    def __init__(self, upstream_ports: list[int], cut_after: tuple[int, int], rng: random.Random) -> None:
        self.port = free_port()
        self._upstreams = upstream_ports
        self.cut_after = cut_after
        self._rng = rng
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._pumps):
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream = self._rng.choice(self._upstreams)  # the same gateway again (it still holds the session) or not
        budget = self._rng.randint(*self.cut_after)
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", upstream)
        except OSError:
            client_writer.transport.abort()
            return
        up = asyncio.create_task(self._pump(client_reader, server_writer, None))
        down = asyncio.create_task(self._pump(server_reader, client_writer, budget))
        self._pumps |= {up, down}
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (up, down):
                task.cancel()
            client_writer.transport.abort()
            server_writer.transport.abort()
            self._pumps -= {up, down}

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, budget: int | None) -> None:
        while True:
            data = await reader.read(4096)
            if not data:
                return
            if budget is not None:
                if len(data) >= budget:
                    writer.write(data[:budget])
                    await writer.drain()
                    self.cuts += 1
                    return
                budget -= len(data)
            writer.write(data)
            await writer.drain()


@pytest.fixture(scope="module")
def fast_playback(nats_url: str, database_url: str) -> Iterator[RunningSystem]:
    """Two gateways; playback at 96 fps (a chunk every 0.125 s) so a hundred reconnects take seconds, not minutes:
    pacing is not what this test is about, and it still runs."""
    settings = {"TURBOSERVE_PLAYBACK_FPS": "96", "TURBOSERVE_LINGER_S": "30"}
    with running_system(nats_url, database_url, workers=1, gateways=2, settings=settings) as running:
        yield running


@pytest_asyncio.fixture
async def proxy(fast_playback: RunningSystem) -> AsyncIterator[CuttingProxy]:
    ports = [int(fast_playback.http_url.rsplit(":", 1)[1]), *fast_playback.more_gateway_ports]
    async with CuttingProxy(ports, cut_after=(1, 30_000), rng=random.Random(2026)) as running:
        yield running


async def test_a_hundred_cuts_at_random_bytes_change_nothing_the_client_ends_with(
    fast_playback: RunningSystem, proxy: CuttingProxy,
) -> None:
    reference_client = await TurboServeClient.connect(fast_playback.ws_url, TOKENS[1])
    try:
        started = await start_when_workers_registered(reference_client, PROMPT, SEED)
        reference = await receive(reference_client, str(started["session_id"]), CHUNKS)
        await reference_client.close_session(str(started["session_id"]))
    finally:
        await reference_client.close()

    held: list[ReceivedChunk] = []
    session_id = ""
    reconnects = 0
    while len(held) < CHUNKS:
        assert reconnects < 10 * CUTS, f"{reconnects} reconnects and only {len(held)} chunks"
        try:
            client = await TurboServeClient.connect(proxy.url, TOKENS[0])
        except (TimeoutError, OSError, InvalidMessage, ConnectionClosed):
            reconnects += 1  # cut during the handshake
            continue
        try:
            if not session_id:
                session_id = str((await client.start(PROMPT, SEED))["session_id"])
            else:
                await client.resume(session_id, next_seq=len(held))
            while len(held) < CHUNKS:
                chunk = await client.next_chunk(session_id, timeout_s=2.0)
                assert chunk.header.seq == len(held), f"got seq {chunk.header.seq}, holding {len(held)}"
                held.append(chunk)
                if proxy.cuts >= CUTS:
                    proxy.cut_after = (10**9, 10**9)  # enough cuts: let the rest through
        except (TimeoutError, ConnectionClosed, OSError):
            reconnects += 1
        except ServerError as exc:  # the gateway has not seen the cut connection end yet: it still drives it
            assert exc.code == "invalid_state", exc
            reconnects += 1
            await asyncio.sleep(0.05)
        finally:
            with contextlib.suppress(Exception):
                await client.close()
    final = await TurboServeClient.connect(fast_playback.ws_url, TOKENS[0])
    try:
        await final.resume(session_id, next_seq=len(held))
        await final.close_session(session_id)
    finally:
        await final.close()

    assert [c.header.seq for c in held] == list(range(CHUNKS))
    differing = [c.header.seq for c, r in zip(held, reference, strict=True) if c.frames != r.frames]
    assert not differing, f"chunks {differing} differ from the undisturbed run's bytes"
    assert proxy.cuts >= CUTS, f"only {proxy.cuts} cuts happened in {CHUNKS} chunks"
