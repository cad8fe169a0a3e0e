"""The worker's batch loop on the real tiny model, with emission captured in memory instead of NATS."""

from __future__ import annotations

import asyncio
import io
import time
from collections import defaultdict
from collections.abc import AsyncIterator

import numpy as np
import pytest
from PIL import Image

from services.common.chunk_frame import ChunkHeader, unpack_chunk
from services.common.errors import StaleEpoch, UnknownSession
from services.common.messages import AttachSession, ChangePrompt, DetachSession, RequestChunks
from services.gpu_worker.engine import ChunkEngine
from services.gpu_worker.frames import JpegEncoder
from services.gpu_worker.model import StreamingVideoModel, get_config
from tests.synthetic_models import load_tiny

CONFIG = get_config("tiny")


class Captured:
    def __init__(self) -> None:
        self.chunks: dict[str, list[tuple[ChunkHeader, list[bytes]]]] = defaultdict(list)
        self.arrived = asyncio.Condition()

    async def emit(self, session_id: str, payload: bytes) -> None:
        async with self.arrived:
            self.chunks[session_id].append(unpack_chunk(payload))
            self.arrived.notify_all()

    async def wait_for(
        self, session_id: str, count: int, timeout_s: float = 30.0
    ) -> list[tuple[ChunkHeader, list[bytes]]]:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: len(self.chunks[session_id]) >= count), timeout_s)
        return self.chunks[session_id]


@pytest.fixture(scope="module")
def model() -> StreamingVideoModel:
    return load_tiny(max_sessions=8)


@pytest.fixture
async def running(model: StreamingVideoModel) -> AsyncIterator[tuple[ChunkEngine, Captured]]:
    captured = Captured()
    engine = ChunkEngine(
        model, JpegEncoder(90), captured.emit, worker_id="w1", model_name="tiny",
        frame_size=(CONFIG.width_px, CONFIG.height_px), max_batch=4, replay_depth=3,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(engine.run(stop))
    yield engine, captured
    stop.set()
    await task
    for session in list(engine.sessions.values()):
        await engine.detach(DetachSession(session_id=session.session_id, epoch=session.epoch))


def attach(session_id: str, *, seed: int = 1, epoch: int = 1, next_seq: int = 0) -> AttachSession:
    return AttachSession(
        session_id=session_id, epoch=epoch, seed=seed, model="tiny", next_seq=next_seq, prompts=((0, "red tide"),)
    )


def pixels(frames: list[bytes]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(f))) for f in frames]).astype(np.int16)


def assert_same_frames(want: list[bytes], got: list[bytes]) -> None:
    """Equal up to batch composition (``batch_tolerance`` per raw value) seen through JPEG: requantisation can turn
    a one-level difference into a few dozen at an edge of the synthetic model's noisy frames, so the bound is on
    the mean, with a loose cap on the worst pixel. A lost cache or RNG state moves the mean by tens."""
    diff = np.abs(pixels(want) - pixels(got))
    assert diff.mean() <= 1.0 and diff.max() <= 48, (diff.mean(), diff.max())


async def test_ready_sessions_share_one_batched_forward(running: tuple[ChunkEngine, Captured]) -> None:
    engine, captured = running
    for sid in ("a", "b", "c"):
        await engine.attach(attach(sid))
    for sid in ("a", "b", "c"):
        await engine.credit(RequestChunks(session_id=sid, epoch=1, up_to_seq=1))
    chunks = [await captured.wait_for(sid, 2) for sid in ("a", "b", "c")]
    assert max(header.timings_ms["batch"] for per_session in chunks for header, _ in per_session) >= 2
    assert all([h.seq for h, _ in per_session] == [0, 1] for per_session in chunks)


async def test_no_chunk_is_generated_or_sent_beyond_the_credit(running: tuple[ChunkEngine, Captured]) -> None:
    engine, captured = running
    await engine.attach(attach("a"))
    await engine.credit(RequestChunks(session_id="a", epoch=1, up_to_seq=0))
    await captured.wait_for("a", 1)
    await engine.credit(RequestChunks(session_id="a", epoch=1, up_to_seq=0))
    assert engine.chunks_produced()["a"] == 1 and len(captured.chunks["a"]) == 1


async def test_a_session_attached_mid_stream_on_a_fresh_worker_continues_with_identical_frames(
    running: tuple[ChunkEngine, Captured],
) -> None:
    engine, captured = running
    await engine.attach(attach("original", seed=9))
    await engine.credit(RequestChunks(session_id="original", epoch=1, up_to_seq=3))
    reference = await captured.wait_for("original", 4)
    await engine.attach(attach("moved", seed=9, epoch=2, next_seq=2))
    await engine.credit(RequestChunks(session_id="moved", epoch=2, up_to_seq=3))
    moved = await captured.wait_for("moved", 2)
    assert [h.seq for h, _ in moved] == [2, 3] and all(h.epoch == 2 for h, _ in moved)
    for (_, want), (_, got) in zip(reference[2:], moved, strict=True):
        assert_same_frames(want, got)


async def test_a_resend_replays_the_same_bytes_without_regenerating(running: tuple[ChunkEngine, Captured]) -> None:
    engine, captured = running
    await engine.attach(attach("a"))
    await engine.credit(RequestChunks(session_id="a", epoch=1, up_to_seq=2))
    first = list(await captured.wait_for("a", 3))
    await engine.credit(RequestChunks(session_id="a", epoch=1, up_to_seq=2, resend_from_seq=1))
    replayed = (await captured.wait_for("a", 5))[3:]
    assert [h.seq for h, _ in replayed] == [1, 2]
    assert [f for _, f in replayed] == [f for _, f in first[1:]]
    assert engine.chunks_produced()["a"] == 3


async def test_a_prompt_change_takes_effect_exactly_at_its_chunk(running: tuple[ChunkEngine, Captured]) -> None:
    engine, captured = running
    for sid in ("same", "changed"):
        await engine.attach(attach(sid, seed=5))
    engine.change_prompt(ChangePrompt(session_id="changed", epoch=1, from_seq=2, prompt="blue forest"))
    for sid in ("same", "changed"):
        await engine.credit(RequestChunks(session_id=sid, epoch=1, up_to_seq=2))
    same, changed = await captured.wait_for("same", 3), await captured.wait_for("changed", 3)
    for seq in (0, 1):
        assert_same_frames(same[seq][1], changed[seq][1])
    assert np.abs(pixels(same[2][1]) - pixels(changed[2][1])).mean() > 1.0


async def test_messages_of_an_older_epoch_or_an_unknown_session_are_refused(
    running: tuple[ChunkEngine, Captured],
) -> None:
    engine, _ = running
    await engine.attach(attach("a", epoch=3))
    with pytest.raises(StaleEpoch):
        await engine.credit(RequestChunks(session_id="a", epoch=2, up_to_seq=5))
    with pytest.raises(StaleEpoch):
        await engine.attach(attach("a", epoch=2))
    with pytest.raises(UnknownSession):
        await engine.detach(DetachSession(session_id="nobody", epoch=1))
    await engine.detach(DetachSession(session_id="a", epoch=3))
    assert "a" not in engine.sessions


async def test_chunks_of_a_batch_leave_one_by_one_as_their_frames_are_encoded(
    running: tuple[ChunkEngine, Captured],
) -> None:
    engine, captured = running
    for sid in ("a", "b", "c"):
        await engine.attach(attach(sid))
    for sid in ("a", "b", "c"):
        await engine.credit(RequestChunks(session_id=sid, epoch=1, up_to_seq=0))
    headers = [(await captured.wait_for(sid, 1))[0][0] for sid in ("a", "b", "c")]
    waits = sorted(h.timings_ms["encode_ms"] for h in headers)
    assert all(h.timings_ms["batch"] == 3 for h in headers), "the three sessions shared one forward"
    assert waits[0] < waits[1] < waits[2], "each chunk waited only for the frames encoded before its own"
    for h in headers:  # published after its forward pass and its encoding (1 ms for wall vs monotonic clocks)
        t = h.timings_ms
        assert t["sent_at_unix_ms"] - t["ready_at_unix_ms"] >= t["model_ms"] + t["encode_ms"] - 1.0


async def test_a_failing_forward_pass_stops_the_loop_with_its_error_instead_of_hanging(
    model: StreamingVideoModel,
) -> None:
    class Broken(RuntimeError):
        pass

    captured = Captured()
    engine = ChunkEngine(
        model, JpegEncoder(90), captured.emit, worker_id="w1", model_name="tiny",
        frame_size=(CONFIG.width_px, CONFIG.height_px), max_batch=4, replay_depth=3,
    )
    await engine.attach(attach("a"))
    original = model.generate

    def broken(handles: object) -> object:
        raise Broken("device lost")

    model.generate = broken  # type: ignore[method-assign,assignment]
    try:
        await engine.credit(RequestChunks(session_id="a", epoch=1, up_to_seq=0))
        with pytest.raises(Broken):
            await asyncio.wait_for(engine.run(asyncio.Event()), 10)
    finally:
        model.generate = original  # type: ignore[method-assign]
        await engine.detach(DetachSession(session_id="a", epoch=1))


class _EverySnapshotHooks:
    """Residency hooks that ask for a snapshot after every chunk and keep nothing."""

    async def ensure_resident(self, session: object) -> None:
        return None

    async def fetch_state(self, msg: object) -> None:
        return None

    def snapshot_due(self, session_id: str, chunks_done: int) -> bool:
        return True

    def after_batch(self, batch: object, exported: object) -> None:
        return None

    async def discard(self, session: object) -> None:
        return None


async def test_work_after_the_encoding_counts_as_the_next_chunks_queueing(model: StreamingVideoModel) -> None:
    """The snapshot copy after a batch's encoding delays the next chunk: its queue time must show it, not vanish
    between batches."""
    captured = Captured()
    engine = ChunkEngine(
        model, JpegEncoder(90), captured.emit, worker_id="w1", model_name="tiny",
        frame_size=(CONFIG.width_px, CONFIG.height_px), max_batch=4, replay_depth=3, hooks=_EverySnapshotHooks(),
    )
    original = model.export_state

    def slow_export(handle: object) -> object:
        time.sleep(0.2)
        return original(handle)  # type: ignore[arg-type]

    model.export_state = slow_export  # type: ignore[method-assign,assignment]
    stop = asyncio.Event()
    task = asyncio.create_task(engine.run(stop))
    try:
        await engine.attach(attach("a"))
        await engine.credit(RequestChunks(session_id="a", epoch=1, up_to_seq=1))
        (_, _), (second, _) = await captured.wait_for("a", 2)
    finally:
        stop.set()
        await task
        model.export_state = original  # type: ignore[method-assign]
        await engine.detach(DetachSession(session_id="a", epoch=1))
    assert second.timings_ms["queue_ms"] >= 150, second.timings_ms


async def test_the_chunk_due_soonest_is_generated_first(model: StreamingVideoModel) -> None:
    """Batches serve the earliest deadline, not the earliest credit: a stream about to stall goes before one that
    has a chunk in hand, whatever order their credits came in."""
    captured = Captured()
    order: list[str] = []

    async def emit(session_id: str, payload: bytes) -> None:
        order.append(session_id)
        await captured.emit(session_id, payload)

    engine = ChunkEngine(model, JpegEncoder(90), emit, worker_id="w1", model_name="tiny",
                         frame_size=(CONFIG.width_px, CONFIG.height_px), max_batch=1, replay_depth=3)
    now_ms = time.time() * 1e3
    for sid, due_in_ms in (("relaxed", 3000.0), ("urgent", 100.0), ("soon", 900.0)):
        await engine.attach(attach(sid))
        await engine.credit(RequestChunks(session_id=sid, epoch=1, up_to_seq=0, due_unix_ms=now_ms + due_in_ms,
                                          interval_ms=750.0))
    stop = asyncio.Event()
    task = asyncio.create_task(engine.run(stop))
    try:
        await captured.wait_for("relaxed", 1)
    finally:
        stop.set()
        await task
    assert order == ["urgent", "soon", "relaxed"]
    header, _ = captured.chunks["urgent"][0]
    assert header.timings_ms["due_unix_ms"] == pytest.approx(now_ms + 100.0), "each chunk says when it was due"
    for sid in order:
        await engine.detach(DetachSession(session_id=sid, epoch=1))


async def test_an_exact_credit_takes_back_what_was_not_generated_yet(running: tuple[ChunkEngine, Captured]) -> None:
    """A pause: credit up to seq 5 lowered to seq 0 stops the stream after at most the batch already running."""
    engine, captured = running
    await engine.attach(attach("a"))
    async with engine.model_lock:  # hold the first batch so the take-back lands before it ends
        await engine.credit(RequestChunks(session_id="a", epoch=1, up_to_seq=5))
        await asyncio.sleep(0.05)
        await engine.credit(RequestChunks(session_id="a", epoch=1, up_to_seq=0, exact=True))
    await captured.wait_for("a", 1)
    await asyncio.sleep(0.5)
    assert engine.chunks_produced()["a"] <= 1 and len(captured.chunks["a"]) == 1


async def paced_engine(model: StreamingVideoModel, captured: Captured) -> ChunkEngine:
    """An engine with a paced stream "waiting", credited for its first chunk."""
    engine = ChunkEngine(model, JpegEncoder(90), captured.emit, worker_id="w1", model_name="tiny",
                         frame_size=(CONFIG.width_px, CONFIG.height_px), max_batch=4, replay_depth=3)
    await engine.attach(attach("waiting"))
    await engine.credit(RequestChunks(session_id="waiting", epoch=1, up_to_seq=0, interval_ms=750.0,
                                      due_unix_ms=time.time() * 1e3 + 1000.0))
    return engine


@pytest.mark.parametrize(("waiting_due_in_ms", "batch"), [(400.0, 2.0), (-100.0, 1.0)],
                         ids=["due_soon_so_waited_for", "overdue_so_paused_and_not_waited_for"])
async def test_a_batch_with_slack_waits_for_a_stream_about_to_be_credited_but_not_for_a_paused_one(
    model: StreamingVideoModel, waiting_due_in_ms: float, batch: float
) -> None:
    captured = Captured()
    engine = await paced_engine(model, captured)
    stop = asyncio.Event()
    task = asyncio.create_task(engine.run(stop))
    try:
        await captured.wait_for("waiting", 1)
        session = engine.sessions["waiting"]
        session.due_unix_ms = time.time() * 1e3 + waiting_due_in_ms  # when its next credit comes, or came
        await engine.attach(attach("ready"))
        credited_s = time.monotonic()
        await engine.credit(RequestChunks(session_id="ready", epoch=1, up_to_seq=0, interval_ms=750.0,
                                          due_unix_ms=time.time() * 1e3 + 5000.0))
        await asyncio.sleep(0.2)
        if waiting_due_in_ms > 0:
            assert "ready" not in captured.chunks, "ran at once although a stream was due to join"
            await engine.credit(RequestChunks(session_id="waiting", epoch=1, up_to_seq=1, interval_ms=750.0,
                                              due_unix_ms=time.time() * 1e3 + 750.0))
        await captured.wait_for("ready", 1)
        assert time.monotonic() - credited_s < 2.0, "held for a stream that was not coming (its deadline allowed 4 s)"
    finally:
        stop.set()
        await task
        for sid in list(engine.sessions):
            await engine.detach(DetachSession(session_id=sid, epoch=1))
    header, _ = captured.chunks["ready"][0]
    assert header.timings_ms["batch"] == batch
