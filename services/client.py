"""Python client for the gateway, and `turboserve client`: stream a session from the terminal, save its frames.

One WebSocket connection can hold several sessions; a reader task routes binary chunk frames to each session's
queue and text messages to whoever waits for them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect

from services.common import event_loop
from services.common.chunk_frame import ChunkHeader, unpack_chunk

T = TypeVar("T")


class ServerError(Exception):
    """The gateway answered with an error message; ``code`` is the protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass
class ReceivedChunk:
    header: ChunkHeader
    frames: list[bytes]
    received_at_unix_ms: float


@dataclass
class _Routes:
    """Chunks per session; replies to this client's requests in order; notices the gateway sends unasked (a
    session moved to another worker), kept apart so that a notice is never taken for the reply to a request."""

    chunks: dict[str, asyncio.Queue[ReceivedChunk]] = field(default_factory=lambda: defaultdict(asyncio.Queue))
    messages: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    notices: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)


def is_notice(message: dict[str, Any]) -> bool:
    return message.get("type") == "state" and message.get("reason") == "moved"


class TurboServeClient:
    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._routes = _Routes()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, url: str, token: str) -> TurboServeClient:
        ws = await connect(url, additional_headers={"Authorization": f"Bearer {token}"}, max_size=2**24)
        return cls(ws)

    async def _read(self) -> None:
        async for raw in self._ws:
            if isinstance(raw, bytes):
                header, frames = unpack_chunk(raw)
                self._routes.chunks[header.session_id].put_nowait(ReceivedChunk(header, frames, time.time() * 1e3))
            else:
                message = json.loads(raw)
                await (self._routes.notices if is_notice(message) else self._routes.messages).put(message)

    @property
    def connected(self) -> bool:
        """False once the gateway closed the connection (or died): reconnect, through another gateway if need be."""
        return not self._reader.done()

    async def send(self, message: dict[str, Any]) -> None:
        await self._ws.send(json.dumps(message))

    async def expect(self, kind: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """The next text message; an error message raises ServerError, another kind is a protocol surprise."""
        message = await self._next(self._routes.messages, timeout_s, "no answer")
        if message.get("type") == "error":
            raise ServerError(str(message.get("code")), str(message.get("message")))
        if message.get("type") != kind:
            raise ServerError("unexpected", f"expected {kind!r}, got {message!r}")
        return message

    async def notice(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """The next message the gateway sent unasked: a ``state`` with reason ``moved``."""
        return await self._next(self._routes.notices, timeout_s, "no notice")

    async def start(self, prompt: str, seed: int = 0) -> dict[str, Any]:
        await self.send({"type": "start", "prompt": prompt, "seed": seed})
        return await self.expect("started")

    async def next_chunk(self, session_id: str, timeout_s: float = 30.0) -> ReceivedChunk:
        return await self._next(self._routes.chunks[session_id], timeout_s, f"no chunk of {session_id}")

    async def _next(self, queue: asyncio.Queue[T], timeout_s: float, what: str) -> T:
        """What ``queue`` holds next; ConnectionError as soon as the connection is gone and the queue is empty
        (rather than waiting out ``timeout_s``), TimeoutError after ``timeout_s``."""
        if not queue.empty() or not self._reader.done():
            got = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({got, self._reader}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if got in done:
                return got.result()
            got.cancel()
            if not done:
                raise TimeoutError(f"{what} within {timeout_s:g} s")
        raise ConnectionError("the connection to the gateway is closed")

    def pending_chunks(self, session_id: str) -> int:
        return self._routes.chunks[session_id].qsize()

    async def set_prompt(self, session_id: str, prompt: str) -> dict[str, Any]:
        await self.send({"type": "prompt", "session_id": session_id, "prompt": prompt})
        return await self.expect("prompt_set")

    async def pause(self, session_id: str) -> dict[str, Any]:
        """Returns the state message; chunks before its ``next_seq`` were already requested and still arrive."""
        await self.send({"type": "pause", "session_id": session_id})
        return await self.expect("state")

    async def resume(self, session_id: str, next_seq: int | None = None) -> dict[str, Any]:
        """``next_seq``: the seq wanted next (one past the last held), so any gateway continues exactly there."""
        message: dict[str, Any] = {"type": "resume", "session_id": session_id}
        if next_seq is not None:
            message["next_seq"] = next_seq
        await self.send(message)
        return await self.expect("state")

    async def list_sessions(self) -> list[dict[str, Any]]:
        """This token's open sessions, through every gateway: ``session_id``, ``status``, ``next_seq``, ``prompt``."""
        await self.send({"type": "list"})
        return list((await self.expect("sessions"))["sessions"])

    async def close_session(self, session_id: str) -> dict[str, Any]:
        await self.send({"type": "close", "session_id": session_id})
        return await self.expect("closed")

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="ws://127.0.0.1:8080/ws", help="gateway WebSocket URL")
    parser.add_argument("--token", required=True, help="client token (printed by `turboserve up`)")
    parser.add_argument("--prompt", default="a slow sunrise over a violet sea")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunks", type=int, default=8, help="chunks to receive before closing")
    parser.add_argument("--out", type=Path, default=None,
                        help="clip.mp4 (or .mkv, .webm): a video at the stream's frame rate; any other path: a folder "
                             "of the JPEG frames")


async def _stream(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from services.clip_writer import ClipWriter

    client = await TurboServeClient.connect(args.url, args.token)
    try:
        started = await client.start(args.prompt, args.seed)
        session_id = started["session_id"]
        with contextlib.ExitStack() as stack:
            clip = stack.enter_context(ClipWriter(args.out, float(started["fps"]))) if args.out else None
            with Progress() as progress:
                task = progress.add_task(f"session {session_id[:8]}", total=args.chunks)
                for _ in range(args.chunks):
                    chunk = await client.next_chunk(session_id)
                    if clip is not None:
                        clip.add(chunk.header.first_frame, chunk.frames)
                    shown = {k: v for k, v in chunk.header.timings_ms.items() if not k.endswith("_unix_ms")}
                    timings = ", ".join(f"{k}={v:.1f}" for k, v in shown.items())
                    progress.console.print(f"chunk {chunk.header.seq}: {len(chunk.frames)} frames ({timings})")
                    progress.advance(task)
        if clip is not None:
            print(f"wrote {clip.frames} frames to {args.out}")
        await client.close_session(session_id)
    except ServerError as exc:
        print(f"server error {exc}")
        return 1
    finally:
        await client.close()
    return 0


def connect_problem(url: str, exc: BaseException) -> str | None:
    """One line naming a user's mistake with the URL, the token or the gateway, and its fix; None for anything
    else (a bug, which keeps its traceback)."""
    from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI

    if isinstance(exc, InvalidURI):
        return f"{url} is not a WebSocket URL: use ws://host:port/ws (or wss://)"
    if isinstance(exc, InvalidStatus) and exc.response.status_code == 401:
        return "the gateway refused the token (401): use a token from TURBOSERVE_TOKENS (printed by `turboserve up`)"
    if isinstance(exc, InvalidStatus):
        return f"the gateway at {url} answered HTTP {exc.response.status_code}: is the path /ws?"
    if isinstance(exc, InvalidHandshake):
        return f"{url} did not answer as a WebSocket server ({exc})"
    if isinstance(exc, TimeoutError):
        return f"the gateway at {url} did not answer in time"
    if isinstance(exc, OSError):
        return f"cannot reach the gateway at {url} ({exc.strerror or exc}): is it running? (`turboserve up`)"
    return None


def run_client_cli(args: argparse.Namespace) -> int:
    try:
        return event_loop.run(_stream(args))
    except Exception as exc:
        problem = connect_problem(args.url, exc)
        if problem is None:
            raise
        print(f"turboserve client: {problem}", file=sys.stderr)
        return 2
