"""A snapshot read whose chunks stop coming: gone when the stream no longer holds them, Unavailable when it does."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import nats.errors
import pytest

from services.common.errors import Unavailable
from services.state_store.errors import SnapshotGone
from services.state_store.jetstream_blobs import download


class _SilentSubscription:
    async def next_msg(self, timeout: float) -> Any:
        raise nats.errors.TimeoutError

    async def unsubscribe(self) -> None:
        return None


class _Stream:
    """Enough of a JetStreamContext for ``download``: a subscription that delivers nothing, and a stream that
    says whether it still holds the object's chunks."""

    def __init__(self, holds_chunks: bool) -> None:
        self.holds_chunks = holds_chunks
        self.probes = 0

    async def subscribe(self, subject: str, **kwargs: Any) -> _SilentSubscription:
        return _SilentSubscription()

    async def stream_info(self, stream: str, subjects_filter: str) -> Any:
        self.probes += 1
        subjects = {subjects_filter: 3} if self.holds_chunks else {}
        return SimpleNamespace(state=SimpleNamespace(subjects=subjects))


async def test_chunks_still_stored_but_not_sent_are_unavailable_after_the_timeout() -> None:
    stream = _Stream(holds_chunks=True)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="holds the chunks .* but sent none within 0.5 s"):
        await download(stream, "b", "s1.x", bytearray(10), chunk_timeout_s=0.5, what="snapshot x")  # type: ignore[arg-type]
    assert time.monotonic() - started >= 0.5 and stream.probes >= 2, "it kept asking until the timeout"


async def test_chunks_the_stream_no_longer_holds_are_gone_at_the_first_probe() -> None:
    stream = _Stream(holds_chunks=False)
    with pytest.raises(SnapshotGone, match="purged"):
        await download(stream, "b", "s1.x", bytearray(10), chunk_timeout_s=30.0, what="snapshot x")  # type: ignore[arg-type]
    assert stream.probes == 1
