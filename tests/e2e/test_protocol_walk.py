"""Every message and error code docs/protocol.md documents, walked against a running system (gateway, scheduler
and a worker as processes on NATS and PostgreSQL) over a raw WebSocket: each answer has exactly the documented
fields, each chunk header the documented keys and timings, each refusal its documented code."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from websockets.asyncio.client import ClientConnection, connect

from services.client import TurboServeClient
from tests.e2e.conftest import TOKENS, RunningSystem, running_system
from tests.protocol_doc import PROTOCOL_DOC, ProtocolDoc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
DOC = ProtocolDoc.read()
ROOT = PROTOCOL_DOC.parents[1]
WALKED_ELSEWHERE = {
    "slow_consumer": "tests/integration/test_gateway_streaming.py::test_a_client_that_stops_reading_gets_slow_"
                     "consumer_and_close_1013",
    "unavailable": "tests/integration/test_gateway_bad_input.py::test_a_scheduler_refusal_reaches_the_client_as_a_"
                   "documented_code",
    "internal": "tests/unit/test_protocol_fuzz.py: never answered to any input; reserved for our bugs",
}
"""Codes this walk cannot cause on a healthy system, and the test that causes each (or proves it is never sent)."""


@pytest.fixture(scope="module")
def small_system(nats_url: str, database_url: str) -> Iterator[RunningSystem]:
    with running_system(nats_url, database_url, workers=1,
                        settings={"TURBOSERVE_MAX_SESSIONS_PER_TOKEN": "2"}) as running:
        yield running


class RawClient:
    """A WebSocket that keeps text messages as parsed maps and chunk frames as (header map, frame count)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.chunks: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.arrivals: list[str | int] = []
        """What arrived, in order: a text message's type, a chunk's seq."""
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            if isinstance(raw, bytes):
                (length,) = struct.unpack(">I", raw[4:8])
                header = msgpack.unpackb(raw[8:8 + length])
                self.arrivals.append(header["seq"])
                await self.chunks.put(header)
            else:
                message = json.loads(raw)
                self.arrivals.append(message["type"])
                await self.messages.put(message)

    async def ask(self, message: dict[str, Any] | str | bytes) -> dict[str, Any]:
        await self.ws.send(message if isinstance(message, (str, bytes)) else json.dumps(message))
        return await asyncio.wait_for(self.messages.get(), timeout=60)

    async def answer_to(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a documented client message; check its answer is the documented type with exactly its fields."""
        documented = DOC.client[message["type"]]
        assert set(message) - {"type"} <= set(documented.fields), f"undocumented fields in {message}"
        answer = await self.ask(message)
        assert answer["type"] == documented.answer, answer
        assert set(answer) - {"type"} == set(DOC.server[answer["type"]]), answer
        return answer

    async def refused(self, message: dict[str, Any] | str | bytes, code: str) -> dict[str, Any]:
        answer = await self.ask(message)
        assert (answer["type"], answer["code"]) == ("error", code), answer
        assert set(answer) - {"type"} == set(DOC.server["error"]), answer
        return answer

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


async def raw_client(system: RunningSystem) -> RawClient:
    ws = await connect(f"{system.ws_url}?token={TOKENS[0]}", max_size=2**24)
    return RawClient(ws)


async def start_when_worker_registered(client: RawClient, message: dict[str, Any]) -> dict[str, Any]:
    for _ in range(900):
        answer = await client.ask(message)
        if answer.get("code") != "unavailable":
            break
        await asyncio.sleep(0.1)
    assert answer["type"] == "started", answer
    assert set(answer) - {"type"} == set(DOC.server["started"]), answer
    return answer


async def test_every_documented_message_gets_its_documented_answer(small_system: RunningSystem) -> None:
    client = await raw_client(small_system)
    try:
        started = await start_when_worker_registered(client, {"type": "start", "prompt": "a red fox", "seed": 3})
        session_id = started["session_id"]
        first = await asyncio.wait_for(client.chunks.get(), timeout=60)
        assert list(first) == DOC.header_keys
        assert (first["t"], first["v"], first["seq"], first["session_id"]) == ("chunk", 1, 0, session_id)
        assert {"queue_ms", "model_ms", "encode_ms", "batch", "ready_at_unix_ms", "sent_at_unix_ms"} \
            <= set(first["timings_ms"]) <= set(DOC.timings)
        prompt_set = await client.answer_to({"type": "prompt", "session_id": session_id, "prompt": "a blue whale"})
        assert prompt_set["from_seq"] >= 1
        await client.ws.send(json.dumps({"type": "played", "session_id": session_id, "seq": 0}))
        listed = await client.answer_to({"type": "list"})  # the first answer after played: played has none
        assert listed["more"] == 0
        assert [(s["session_id"], s["status"]) for s in listed["sessions"]] == [(session_id, "active")]
        assert set(listed["sessions"][0]) == {"session_id", "status", "next_seq", "prompt"}
        paused = await client.answer_to({"type": "pause", "session_id": session_id})
        assert (paused["status"], paused["reason"]) == ("idle", "paused")
        while first["seq"] < paused["next_seq"] - 1:  # what was requested before the pause still arrives
            first = await asyncio.wait_for(client.chunks.get(), timeout=60)
        before_resume = len(client.arrivals)
        resumed = await client.answer_to({"type": "resume", "session_id": session_id, "next_seq": 1})
        assert (resumed["status"], resumed["reason"], resumed["next_seq"]) == ("active", "resumed", 1)
        assert (await asyncio.wait_for(client.chunks.get(), timeout=60))["seq"] == 1, "exactly after what it holds"
        assert client.arrivals[before_resume] == "state", "a chunk the resume brought came before its answer"
        sized = await client.answer_to({"type": "start", "prompt": "a heron", "seed": 4,
                                        "width": started["width"], "height": started["height"]})
        for opened in (session_id, sized["session_id"]):
            closed = await client.answer_to({"type": "close", "session_id": opened})
            assert closed == {"type": "closed", "session_id": opened, "reason": "client"}
        assert set(DOC.client) == {"start", "prompt", "played", "list", "pause", "resume", "close"}, \
            "a new client message: walk it here"
    finally:
        await client.close()


async def test_every_documented_error_code_is_answered_where_the_document_says(small_system: RunningSystem) -> None:
    client = await raw_client(small_system)
    walked: set[str] = set()
    try:
        async def refused(message: dict[str, Any] | str | bytes, code: str) -> dict[str, Any]:
            walked.add(code)
            return await client.refused(message, code)

        assert (await refused("{", "malformed"))["request"] is None
        await refused(msgpack.packb([1, 2]), "malformed")
        await refused({"type": "teleport"}, "unknown_type")
        await refused({"type": "started", "session_id": "x"}, "unknown_type")
        await refused({"type": "pause"}, "invalid_field")
        await refused({"type": "start", "prompt": "a\u0000b"}, "invalid_field")
        version = await refused({"type": "pause", "session_id": "x", "v": True}, "unsupported_version")
        assert version["request"] == "pause"
        await refused({"type": "start", "prompt": "x" * 9000}, "message_too_large")
        unknown = await refused({"type": "pause", "session_id": "no-such-session"}, "unknown_session")
        assert unknown["session_id"] == "no-such-session"
        started = await start_when_worker_registered(client, {"type": "start", "prompt": "a red fox"})
        await client.answer_to({"type": "pause", "session_id": started["session_id"]})
        await refused({"type": "pause", "session_id": started["session_id"]}, "invalid_state")
        second = await client.answer_to({"type": "start", "prompt": "a second fox"})
        limit = await refused({"type": "start", "prompt": "one too many"}, "limit_exceeded")
        assert limit["request"] == "start"
        await client.close()  # the page reloads: its sessions linger, and the token's new connection lists them
        reloaded = await TurboServeClient.connect(small_system.ws_url, TOKENS[0])
        try:
            listed = [s["session_id"] for s in await reloaded.list_sessions()]
            assert listed == [started["session_id"], second["session_id"]], "oldest first"
            for session_id in listed:
                await reloaded.close_session(session_id)
            assert await reloaded.list_sessions() == []
        finally:
            await reloaded.close()
        assert walked | set(WALKED_ELSEWHERE) == set(DOC.error_codes), "a documented code nobody causes"
        for where in WALKED_ELSEWHERE.values():
            path, _, test = where.partition("::")
            assert test == "" or f"def {test}(" in (ROOT / path).read_text(), f"{where} is gone"
    finally:
        await client.close()
