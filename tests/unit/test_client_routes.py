"""The client library keeps the gateway's unasked notices apart from the replies to its own requests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from services.client import TurboServeClient


class ScriptedSocket:
    """Answers every request with the messages scripted for it, in order; a notice can go ahead of a reply."""

    def __init__(self, answers: dict[str, list[dict[str, Any]]]) -> None:
        self._answers = answers
        self._inbox: asyncio.Queue[str | None] = asyncio.Queue()

    async def send(self, raw: str) -> None:
        for message in self._answers[json.loads(raw)["type"]]:
            self._inbox.put_nowait(json.dumps(message))

    async def close(self) -> None:
        self._inbox.put_nowait(None)

    def __aiter__(self) -> AsyncIterator[str]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[str]:
        while (raw := await self._inbox.get()) is not None:
            yield raw


def state(reason: str, epoch: int) -> dict[str, Any]:
    return {"type": "state", "session_id": "s", "status": "active", "epoch": epoch, "worker_id": "w2",
            "reason": reason, "next_seq": 5}


async def test_a_move_notice_that_arrives_before_the_reply_to_a_resume_is_not_taken_for_it() -> None:
    """A resume of an offloaded session places it on another worker: its move notice may come first."""
    socket = ScriptedSocket({"resume": [state("moved", 2), state("resumed", 2)],
                             "close": [{"type": "closed", "session_id": "s", "reason": "client"}]})
    client = TurboServeClient(socket)  # type: ignore[arg-type]
    try:
        assert (await client.resume("s"))["reason"] == "resumed"
        assert (await client.close_session("s"))["type"] == "closed"
        assert (await client.notice(timeout_s=1.0))["reason"] == "moved"
    finally:
        await client.close()
