"""Scripted NATS peers for the gateway's integration tests: a fake scheduler and fake workers on a real nats-server.

They speak the real wire messages on the real subjects, record what they receive, and let a test publish any
chunk it likes (duplicates, out of order, stale epochs) to prove the gateway's fencing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TypeVar

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from websockets.asyncio.client import ClientConnection, connect

from services.common import subjects
from services.common.chunk_frame import ChunkHeader, pack_chunk, unpack_chunk
from services.common.messages import (
    AttachSession,
    ChangePrompt,
    DetachSession,
    OpenSession,
    Placement,
    Reply,
    RequestChunks,
    UpdateSession,
)
from services.common.wire import Message, decode, encode
from services.gateway.app import RunningGateway, running_gateway
from services.gateway.auth import TokenTable
from services.gateway.settings import GatewaySettings

M = TypeVar("M", bound=Message)
FAKE_JPEG = b"\xff\xd8\xff\xe0fake-jpeg\xff\xd9"


def chunk_frame(session_id: str, epoch: int, seq: int, worker_id: str = "w1", frame: bytes = FAKE_JPEG) -> bytes:
    header = ChunkHeader(
        session_id=session_id, epoch=epoch, seq=seq, first_frame=seq * 12, width=64, height=64,
        frame_sizes=(len(frame),), timings_ms={"model_ms": 1.0}, worker_id=worker_id,
    )
    return pack_chunk(header, [frame])


class Recorder:
    """Messages a peer received, with a way to wait for one without sleeping."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._changed = asyncio.Condition()

    async def add(self, msg: Message) -> None:
        async with self._changed:
            self.messages.append(msg)
            self._changed.notify_all()

    async def wait_for(self, kind: type[M], timeout_s: float = 5.0, **fields: object) -> M:
        def found() -> M | None:
            for msg in self.messages:
                if isinstance(msg, kind) and all(getattr(msg, k) == v for k, v in fields.items()):
                    return msg
            return None

        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: found() is not None)
        result = found()
        assert result is not None
        return result


@dataclass
class FakeScheduler:
    """Places every session on ``worker_id`` at epoch 1, refuses an open past the owner's limit the way the real
    scheduler does (limit_exceeded), and acknowledges status updates."""

    nats: NatsClient
    worker_id: str = "w1"
    refuse_open_with: str = ""
    recorder: Recorder = field(default_factory=Recorder)
    epochs: dict[str, tuple[str, int]] = field(default_factory=dict)
    open_by_owner: dict[str, set[str]] = field(default_factory=dict)

    async def start(self) -> None:
        await self.nats.subscribe(subjects.SCHED_OPEN, cb=self._on_open)
        await self.nats.subscribe(subjects.SCHED_UPDATE, cb=self._on_update)

    async def _on_open(self, msg: Msg) -> None:
        request = decode(msg.data, expect=OpenSession)
        assert isinstance(request, OpenSession)
        await self.recorder.add(request)
        if self.refuse_open_with:
            await msg.respond(encode(Reply(ok=False, code=self.refuse_open_with, detail="no capacity")))
            return
        held = self.open_by_owner.setdefault(request.owner, set())
        if 0 < request.max_open_per_owner <= len(held):
            await msg.respond(encode(Reply(ok=False, code="limit_exceeded", detail=f"limit {len(held)}")))
            return
        held.add(request.session_id)
        self.epochs[request.session_id] = (self.worker_id, 1)
        await msg.respond(encode(Placement(request.session_id, self.worker_id, 1, reason="test")))

    async def _on_update(self, msg: Msg) -> None:
        request = decode(msg.data, expect=UpdateSession)
        assert isinstance(request, UpdateSession)
        await self.recorder.add(request)
        if request.status == "active":
            worker_id, epoch = self.epochs[request.session_id]
            await msg.respond(encode(Placement(request.session_id, worker_id, epoch, reason="resume")))
        else:
            if request.status == "closed":
                for held in self.open_by_owner.values():
                    held.discard(request.session_id)
            await msg.respond(encode(Reply(ok=True)))

    async def move(self, session_id: str, worker_id: str) -> int:
        """Re-place a session on its own initiative, as after a lost worker; returns the new epoch."""
        epoch = self.epochs[session_id][1] + 1
        self.epochs[session_id] = (worker_id, epoch)
        placement = Placement(session_id, worker_id, epoch, reason="moved")
        await self.nats.publish(subjects.placement(session_id), encode(placement))
        return epoch


@dataclass
class FakeWorker:
    """Acknowledges control messages (refuses an attach while ``refuse_attach``); with ``auto`` it answers credit with
    chunks, else the test publishes them."""

    nats: NatsClient
    worker_id: str = "w1"
    auto: bool = True
    refuse_attach: bool = False
    frame: bytes = FAKE_JPEG
    recorder: Recorder = field(default_factory=Recorder)
    produced: dict[str, int] = field(default_factory=dict)
    epochs: dict[str, int] = field(default_factory=dict)

    async def start(self) -> None:
        await self.nats.subscribe(subjects.worker_control(self.worker_id), cb=self._on_control)
        await self.nats.subscribe(subjects.worker_credit(self.worker_id), cb=self._on_credit)

    async def _on_control(self, msg: Msg) -> None:
        request = decode(msg.data)
        await self.recorder.add(request)
        if isinstance(request, AttachSession) and self.refuse_attach:
            await msg.respond(encode(Reply(ok=False, code="unavailable", detail="restarting")))
            return
        if isinstance(request, AttachSession):
            self.produced[request.session_id] = request.next_seq
            self.epochs[request.session_id] = request.epoch
        elif not isinstance(request, (ChangePrompt, DetachSession)):
            await msg.respond(encode(Reply(ok=False, code="unknown_type", detail=request.TYPE)))
            return
        await msg.respond(encode(Reply(ok=True)))

    async def _on_credit(self, msg: Msg) -> None:
        credit = decode(msg.data, expect=RequestChunks)
        assert isinstance(credit, RequestChunks)
        await self.recorder.add(credit)
        if not self.auto or credit.epoch != self.epochs.get(credit.session_id):
            return
        if credit.resend_from_seq is not None:
            self.produced[credit.session_id] = credit.resend_from_seq
        while self.produced[credit.session_id] <= credit.up_to_seq:
            seq = self.produced[credit.session_id]
            await self.publish(credit.session_id, credit.epoch, seq)
            self.produced[credit.session_id] = seq + 1

    async def publish(self, session_id: str, epoch: int, seq: int) -> None:
        frame = chunk_frame(session_id, epoch, seq, self.worker_id, self.frame)
        await self.nats.publish(subjects.chunks(session_id), frame)


class Client:
    """A WebSocket client that sorts what it receives into JSON messages and chunk headers."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.chunks: list[ChunkHeader] = []

    async def send(self, **fields: object) -> None:
        await self.ws.send(json.dumps(fields))

    async def next_message(self, timeout_s: float = 5.0) -> dict[str, object]:
        """The next JSON message; chunk frames received before it are collected into ``chunks``."""
        async with asyncio.timeout(timeout_s):
            while True:
                data = await self.ws.recv()
                if isinstance(data, str):
                    message: dict[str, object] = json.loads(data)
                    return message
                header, _ = unpack_chunk(data)
                self.chunks.append(header)

    async def chunks_until(self, count: int, timeout_s: float = 5.0) -> list[ChunkHeader]:
        async with asyncio.timeout(timeout_s):
            while len(self.chunks) < count:
                data = await self.ws.recv()
                assert isinstance(data, bytes), f"expected a chunk, got {data!r}"
                header, frames = unpack_chunk(data)
                assert len(frames) == 1 and frames[0][:2] == FAKE_JPEG[:2]
                self.chunks.append(header)
        return self.chunks


async def interest_registered(nats_client: NatsClient) -> None:
    """Wait until the server holds our subscriptions. Two round trips: with nats-py 2.16 on a fresh connection the
    first flush sometimes returns before the server has processed the SUBs (seen as 503 no responders, ~5%)."""
    await nats_client.flush()
    await nats_client.flush()


ALICE, BOB = "alice-secret", "bob-secret"


@dataclass
class Stack:
    gateway: RunningGateway
    scheduler: FakeScheduler
    worker: FakeWorker
    peers: NatsClient

    @contextlib.asynccontextmanager
    async def client(self, token: str = ALICE) -> AsyncIterator[Client]:
        async with connect(self.gateway.ws_url(token), max_size=None) as ws:
            yield Client(ws)

    async def second_worker(self, worker_id: str) -> FakeWorker:
        worker = FakeWorker(self.peers, worker_id)
        await worker.start()
        await interest_registered(self.peers)
        return worker


@contextlib.asynccontextmanager
async def gateway_stack(nats_url: str, *, auto: bool = True, **overrides: object) -> AsyncIterator[Stack]:
    fields: dict[str, object] = {"port": 0, "linger_s": 30.0, "request_timeout_s": 2.0, **overrides}
    settings = GatewaySettings(tokens=TokenTable.from_mapping({"alice": ALICE, "bob": BOB}), **fields)  # type: ignore[arg-type]
    peers = await nats.connect(nats_url)
    gateway_nats = await nats.connect(nats_url)
    try:
        scheduler = FakeScheduler(peers)
        worker = FakeWorker(peers, "w1", auto=auto)
        await scheduler.start()
        await worker.start()
        await interest_registered(peers)
        async with running_gateway(settings, gateway_nats) as gateway:
            yield Stack(gateway, scheduler, worker, peers)
    finally:
        await gateway_nats.close()
        await peers.close()


async def start_session(client: Client, prompt: str = "a red fox") -> str:
    await client.send(type="start", prompt=prompt, seed=7)
    started = await client.next_message()
    assert started["type"] == "started", started
    return str(started["session_id"])
