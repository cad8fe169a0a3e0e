"""Bad input never crashes the gateway: a bad handshake gets HTTP 401, every bad message an error, and the
connection stays usable afterwards."""

from __future__ import annotations

import asyncio
import json

import msgpack
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from services.common.messages import OpenSession
from tests.integration.gateway_peers import (
    ALICE,
    BOB,
    Client,
    Stack,
    gateway_stack,
    start_session,
)

pytestmark = pytest.mark.integration


async def http_get(stack: Stack, path: str) -> tuple[int, bytes]:
    """A bare HTTP/1.1 GET, to see exactly what the gateway answers outside the WebSocket."""
    reader, writer = await asyncio.open_connection(stack.gateway.host, stack.gateway.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def assert_still_usable(client: Client) -> None:
    session_id = await start_session(client)
    await client.send(type="close", session_id=session_id)
    assert (await client.next_message())["type"] == "closed"


@pytest.mark.parametrize("token", [None, "wrong-secret"], ids=["without_a_token", "with_a_bad_token"])
async def test_a_handshake_is_refused_with_401(nats_url: str, token: str | None) -> None:
    async with gateway_stack(nats_url) as stack:
        url = stack.gateway.ws_url(token) if token else stack.gateway.ws_url("").replace("?token=", "")
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url):
                pass
        assert refused.value.response.status_code == 401


async def test_a_bearer_header_is_accepted_instead_of_the_query_token(nats_url: str) -> None:
    async with gateway_stack(nats_url) as stack:
        url = stack.gateway.ws_url("").replace("?token=", "")
        async with connect(url, additional_headers={"Authorization": f"Bearer {ALICE}"}) as ws:
            await assert_still_usable(Client(ws))


async def test_the_viewer_page_and_the_health_check_answer_over_http(nats_url: str) -> None:
    async with gateway_stack(nats_url) as stack:
        status, body = await http_get(stack, "/")
        assert status == 200 and b"<canvas" in body and b"/ws?token=" in body
        status, body = await http_get(stack, "/healthz")
        assert status == 200 and json.loads(body)["nats_connected"] is True
        status, _ = await http_get(stack, "/nowhere")
        assert status == 404
        status, _ = await http_get(stack, "/favicon.ico")
        assert status == 204
        status, body = await http_get(stack, f"/whoami?token={ALICE}")
        assert status == 200 and json.loads(body) == {"owner": "alice"}
        status, _ = await http_get(stack, "/whoami?token=wrong-secret")
        assert status == 401


BAD_MESSAGES: dict[str, tuple[str | bytes, str]] = {
    "malformed_json": ('{"type": "start", ', "malformed"),
    "json_that_is_not_a_map": ("[1, 2, 3]", "malformed"),
    "malformed_msgpack": (b"\xc1\xff\x00garbage", "malformed"),
    "unknown_type": ('{"type": "teleport", "session_id": "x"}', "unknown_type"),
    "peer_type": (msgpack.packb({"t": "detach_session", "session_id": "x", "epoch": 1}), "unknown_type"),
    "gateway_answer_type": ('{"type": "started", "session_id": "x"}', "unknown_type"),
    "missing_field": ('{"type": "pause"}', "invalid_field"),
    "wrong_field_type": ('{"type": "start", "prompt": 42}', "invalid_field"),
    "oversize_message": (json.dumps({"type": "start", "prompt": "x" * 9000}), "message_too_large"),
    "prompt_too_long": (json.dumps({"type": "start", "prompt": "x" * 2001}), "invalid_field"),
    "empty_prompt": ('{"type": "start", "prompt": "   "}', "invalid_field"),
    "unsupported_size": ('{"type": "start", "prompt": "a fox", "width": 1920, "height": 1080}', "invalid_field"),
    "unknown_session": ('{"type": "pause", "session_id": "no-such-session"}', "unknown_session"),
}


@pytest.mark.parametrize("name", list(BAD_MESSAGES))
async def test_a_bad_message_gets_its_error_code_and_the_connection_stays_usable(nats_url: str, name: str) -> None:
    payload, code = BAD_MESSAGES[name]
    async with gateway_stack(nats_url) as stack, stack.client() as client:
        await client.ws.send(payload)
        error = await client.next_message()
        assert (error["type"], error["code"]) == ("error", code), error
        assert isinstance(error["message"], str) and error["message"]
        await assert_still_usable(client)


async def test_another_tokens_session_looks_like_an_unknown_one(nats_url: str) -> None:
    async with gateway_stack(nats_url) as stack, stack.client(ALICE) as alice, stack.client(BOB) as bob:
        session_id = await start_session(alice)
        for kind in ("prompt", "pause", "resume", "close"):
            fields = {"prompt": "stolen"} if kind == "prompt" else {}
            await bob.send(type=kind, session_id=session_id, **fields)
            error = await bob.next_message()
            assert (error["type"], error["code"], error["session_id"]) == ("error", "unknown_session", session_id)
        await alice.send(type="pause", session_id=session_id)
        assert (await alice.next_message())["status"] == "idle"


async def test_a_token_over_its_session_limit_gets_limit_exceeded(nats_url: str) -> None:
    async with gateway_stack(nats_url, max_sessions_per_token=2) as stack, stack.client() as client:
        first = await start_session(client)
        await start_session(client)
        await client.send(type="start", prompt="one too many")
        error = await client.next_message()
        assert (error["type"], error["code"], error["request"]) == ("error", "limit_exceeded", "start")
        await client.send(type="close", session_id=first)
        assert (await client.next_message())["type"] == "closed"
        await start_session(client)
        async with stack.client(BOB) as bob:
            await start_session(bob)  # the limit is per token


@pytest.mark.parametrize(("peer_code", "client_code"), [
    ("unavailable", "unavailable"), ("stale_epoch", "unavailable"), ("bad_request", "internal"),
])
async def test_a_scheduler_refusal_reaches_the_client_as_a_documented_code(
    nats_url: str, peer_code: str, client_code: str
) -> None:
    """A peer's own code passes through when the protocol documents it; a race with a move is worth a retry;
    any other is our bug."""
    async with gateway_stack(nats_url) as stack, stack.client() as client:
        stack.scheduler.refuse_open_with = peer_code
        await client.send(type="start", prompt="a red fox")
        error = await client.next_message()
        assert (error["type"], error["code"]) == ("error", client_code)
        await stack.scheduler.recorder.wait_for(OpenSession, prompt="a red fox")
        stack.scheduler.refuse_open_with = ""
        await assert_still_usable(client)
        assert len(stack.gateway.hub.registry) == 0


async def test_pausing_a_paused_session_is_an_invalid_state(nats_url: str) -> None:
    async with gateway_stack(nats_url) as stack, stack.client() as client:
        session_id = await start_session(client)
        await client.send(type="pause", session_id=session_id)
        assert (await client.next_message())["status"] == "idle"
        await client.send(type="pause", session_id=session_id)
        error = await client.next_message()
        assert (error["type"], error["code"]) == ("error", "invalid_state")


async def test_a_resume_past_what_the_session_produced_is_an_invalid_field(nats_url: str) -> None:
    """A client cannot hold a chunk the gateway never handed out; the session stays as it was."""
    async with gateway_stack(nats_url) as stack, stack.client() as client:
        session_id = await start_session(client)
        await client.send(type="resume", session_id=session_id, next_seq=999)
        error = await client.next_message()
        assert (error["type"], error["code"]) == ("error", "invalid_field")
        await client.send(type="played", session_id=session_id, seq=-1)
        error = await client.next_message()
        assert (error["type"], error["code"]) == ("error", "invalid_field")
        assert [c.seq for c in await client.chunks_until(2)][:2] == [0, 1], "the stream goes on"


async def test_an_unsupported_version_of_a_readable_request_names_the_request(nats_url: str) -> None:
    async with gateway_stack(nats_url) as stack, stack.client() as client:
        await client.ws.send('{"type": "start", "v": true, "prompt": "a fox"}')
        error = await client.next_message()
        assert (error["code"], error["request"]) == ("unsupported_version", "start"), error


async def test_the_client_cli_names_a_refused_token_in_one_line(nats_url: str) -> None:
    from websockets.exceptions import InvalidStatus

    from services.client import connect_problem

    async with gateway_stack(nats_url) as stack:
        url = stack.gateway.ws_url("").replace("?token=", "")
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url, additional_headers={"Authorization": "Bearer not-a-token"}):
                pass
    problem = connect_problem(url, refused.value)
    assert problem is not None and "refused the token (401)" in problem
