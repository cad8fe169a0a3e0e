"""The worker's batch loop: gather every session with a ready chunk, one batched forward, encode, emit.

Coalescing is the point (the reference implementation ran one session at a time): all ready sessions share one
``model.generate`` call. Each chunk leaves as soon as its own frames are encoded, while the rest of the batch is
still encoding, so a batch's chunks reach the gateway spread out rather than as one burst that the last of them
waits behind. Model calls happen on one thread at a time, serialized by the table's model lock, so attaching a
session never races a forward pass. I/O is injected (``emit``), so this module never touches NATS.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from services.common.chunk_frame import ChunkHeader, pack_chunk
from services.common.errors import InvalidField, StaleEpoch, Unavailable, UnknownSession
from services.common.messages import AttachSession, ChangePrompt, DetachSession, RequestChunks
from services.common.telemetry.chunks import worker_chunk_traces
from services.common.telemetry.metrics import worker_series
from services.common.telemetry.tracing import span
from services.gpu_worker.batch_hold import BatchCost, hold_until_ms
from services.gpu_worker.capacity import realtime_capacity
from services.gpu_worker.frames import JpegEncoder
from services.gpu_worker.model.interface import ChunkOutput, SlotsExhausted, StreamingVideoModel
from services.gpu_worker.session import EncodedChunk, ResidentSession

log = logging.getLogger(__name__)
Emit = Callable[[str, bytes], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ImportedState:
    """A session's state from elsewhere (a snapshot), taken after ``chunks_done`` chunks."""

    tensors: Mapping[str, torch.Tensor]
    chunks_done: int


@dataclass(frozen=True, slots=True)
class _Encoded:
    """One session's chunk of a batch, its frames encoded; ``encode_wait_ms`` counts from the end of the forward
    pass to these frames being ready (the frames of the sessions before it in the batch included)."""

    index: int
    output: ChunkOutput
    frames: list[bytes]
    model_ms: float
    encode_wait_ms: float


@dataclass(frozen=True, slots=True)
class _BatchDone:
    """What the model thread reports once a batch is through."""

    model_ms: float
    encode_ms: float
    encoded_at_s: float
    """On the engine's clock, when the last frames were encoded: the model could have taken the next chunk from
    here, so the snapshot copies and the hand-back to the event loop that follow count as the next chunk's queueing."""
    exported: dict[str, Mapping[str, torch.Tensor]]
    """States copied for snapshots, by session id."""


@dataclass(frozen=True, slots=True)
class SessionTable:
    """The worker's resident sessions and the lock held while the model runs (whoever holds it sees every session
    at a chunk boundary). The engine drives both; residency and spilling read them, and need nothing else of it."""

    model_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    sessions: dict[str, ResidentSession] = field(default_factory=dict)


class ResidencyHooks(Protocol):
    """Where state lives beyond the device slot (services.gpu_worker.state.residency); None means device only."""

    async def ensure_resident(self, session: ResidentSession) -> None:
        """Bring an offloaded session's state back into a slot before it generates."""
        ...

    async def fetch_state(self, msg: AttachSession) -> ImportedState | None:
        """The newest stored state at or before ``msg.next_seq``, or None (regenerate from chunk 0)."""
        ...

    def snapshot_due(self, session_id: str, chunks_done: int) -> bool:
        """Whether to export the session's state once it has made ``chunks_done`` chunks. Called on the model
        thread, once per session and batch, so the export rides the batch's own turn on the model."""
        ...

    def after_batch(self, batch: Sequence[ResidentSession], exported: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Called once per batch after its chunks are recorded, with the states exported for ``snapshot_due``."""
        ...

    async def discard(self, session: ResidentSession) -> None:
        """Drop the offloaded state of a session that leaves this worker."""
        ...


class ChunkEngine:
    def __init__(
        self,
        model: StreamingVideoModel,
        encoder: JpegEncoder,
        emit: Emit,
        *,
        worker_id: str,
        model_name: str,
        frame_size: tuple[int, int],
        max_batch: int,
        replay_depth: int,
        table: SessionTable | None = None,
        hooks: ResidencyHooks | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._model = model
        self._encoder = encoder
        self._emit = emit
        self._worker_id = worker_id
        self._model_name = model_name
        self._width, self._height = frame_size
        self._max_batch = max_batch
        self._replay_depth = replay_depth
        self._clock = clock
        self._table = table if table is not None else SessionTable()
        self._model_lock = self._table.model_lock
        self._work = asyncio.Event()
        self.sessions = self._table.sessions
        self._batch_samples: deque[tuple[int, float]] = deque(maxlen=64)
        self._batch_cost = BatchCost()
        self._interval_ms: float | None = None
        """The chunk interval of the paced streams, as the gateways' credits say (None: none seen yet)."""
        self.hooks = hooks

    @property
    def model_lock(self) -> asyncio.Lock:
        """Held while the model runs; whoever holds it sees every session at a chunk boundary."""
        return self._model_lock

    # --- control, called by the runner ----------------------------------------------------------------------

    async def attach(self, msg: AttachSession) -> None:
        if msg.model != self._model_name:
            raise InvalidField(f"worker {self._worker_id} serves model {self._model_name!r}, not {msg.model!r}")
        current = self.sessions.get(msg.session_id)
        if current is not None and msg.epoch < current.epoch:
            raise StaleEpoch(f"attach of {msg.session_id} at epoch {msg.epoch} < resident epoch {current.epoch}")
        if current is not None and current.seed == msg.seed and current.can_replay_from(msg.next_seq):
            await self._ensure_resident(current)
            current.epoch = msg.epoch
            current.prompts = list(msg.prompts)
            current.silent_until = max(current.silent_until, msg.next_seq)
            current.next_send_seq = msg.next_seq
            self._wake(current)
            return
        if current is not None:
            await self._release(current)
        imported = await self.hooks.fetch_state(msg) if self.hooks is not None else None
        async with self._model_lock:
            try:
                if imported is None:
                    first_prompt = msg.prompts[0][1]
                    handle = await asyncio.to_thread(self._model.new_session, msg.session_id, first_prompt, msg.seed)
                else:
                    handle = await asyncio.to_thread(self._model.import_state, msg.session_id, imported.tensors)
            except SlotsExhausted as exc:
                raise Unavailable(f"worker {self._worker_id} has no free session slot: {exc}") from None
        session = ResidentSession(
            session_id=msg.session_id, epoch=msg.epoch, seed=msg.seed, handle=handle,
            prompts=list(msg.prompts), replay_depth=self._replay_depth, silent_until=msg.next_seq,
            next_send_seq=msg.next_seq,
        )
        if imported is not None:
            session.next_seq = imported.chunks_done
            session.active_prompt = session.prompt_for(imported.chunks_done - 1)
        self.sessions[msg.session_id] = session
        self._wake(session)

    def change_prompt(self, msg: ChangePrompt) -> None:
        self._fenced(msg.session_id, msg.epoch).change_prompt(msg.from_seq, msg.prompt)

    async def credit(self, msg: RequestChunks) -> None:
        session = self._fenced(msg.session_id, msg.epoch)
        await self._ensure_resident(session)
        resend_from = msg.resend_from_seq
        if resend_from is not None and not session.can_replay_from(resend_from):
            await self._rewind(session, resend_from)
            session = self.sessions[msg.session_id]
        session.credit_up_to = msg.up_to_seq if msg.exact else max(session.credit_up_to, msg.up_to_seq)
        if msg.due_unix_ms:
            session.due_unix_ms, session.due_seq, session.interval_ms = msg.due_unix_ms, msg.up_to_seq, msg.interval_ms
            self._interval_ms = msg.interval_ms or self._interval_ms
        if resend_from is not None:
            session.next_send_seq = min(session.next_send_seq, resend_from)
        self._wake(session)
        await self._flush(session)

    async def detach(self, msg: DetachSession) -> None:
        session = self._fenced(msg.session_id, msg.epoch)
        await self._release(session)

    def chunks_produced(self) -> dict[str, int]:
        return {sid: s.next_seq for sid, s in self.sessions.items()}

    def realtime_capacity(self, ceiling: int) -> int:
        """K as measured (see capacity.py), at most ``ceiling``."""
        return realtime_capacity(self._batch_cost, self._interval_ms, ceiling)

    def drain_batch_samples(self) -> tuple[tuple[int, float], ...]:
        """(batch size, per-chunk latency ms) of the batches since the last call, for the scheduler's model."""
        samples = tuple(self._batch_samples)
        self._batch_samples.clear()
        return samples

    # --- the batch loop ---------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        stop_wait = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                batch = self._ready_batch()
                hold_s = self._hold_s(batch) if batch else None
                if not batch or hold_s:
                    self._work.clear()
                    work_wait = asyncio.ensure_future(self._work.wait())
                    await asyncio.wait({work_wait, stop_wait}, timeout=hold_s, return_when=asyncio.FIRST_COMPLETED)
                    work_wait.cancel()
                    continue
                await self._step(batch)
        finally:
            stop_wait.cancel()

    def _ready_batch(self) -> list[ResidentSession]:
        """Earliest deadline first: the chunk whose first frame must play soonest. A session without a deadline
        (delivery pacing, or silently catching up before its first credit) counts as due when it became ready,
        so it neither starves nor jumps a stream that is about to stall."""
        now_ms, now_s = time.time() * 1e3, self._clock()
        ready = [s for s in self.sessions.values() if s.wants_generation() and not s.offloaded]

        def due_ms(session: ResidentSession) -> float:
            deadline = session.deadline_ms(session.next_seq)
            if deadline is not None:
                return deadline
            return now_ms - (now_s - (session.ready_since_s if session.ready_since_s is not None else now_s)) * 1e3

        ready.sort(key=lambda s: (due_ms(s), s.session_id))
        return ready[: self._max_batch]

    def _hold_s(self, batch: list[ResidentSession]) -> float | None:
        """Seconds to wait for the paced streams whose credit comes before this batch must run (batch_hold): a
        stream that made all it was credited gets its next credit when its last chunk starts playing (its due
        time); one whose due time has passed is paused or cut off, not about to join."""
        if len(batch) >= self._max_batch:  # full: nothing can join, and the scan below is on every batch's path
            return None
        now_ms = time.time() * 1e3
        joining_at_ms = [
            s.due_unix_ms for s in self.sessions.values()
            if s.due_unix_ms > now_ms and not s.offloaded and not s.wants_generation()
            and s.next_seq == s.credit_up_to + 1
        ]
        if not joining_at_ms:
            return None
        until_ms = hold_until_ms([s.deadline_ms(s.next_seq) for s in batch], joining_at_ms, self._batch_cost,
                                 self._max_batch)
        if until_ms is None:
            return None
        wait_s = (until_ms - now_ms) / 1e3
        return wait_s if wait_s > 0.001 else None

    async def _step(self, batch: list[ResidentSession]) -> None:
        started = self._clock()
        started_wall_ms = time.time() * 1e3
        loop = asyncio.get_running_loop()
        encoded: asyncio.Queue[_Encoded | BaseException] = asyncio.Queue()
        with worker_chunk_traces.batch(self._worker_id, batch):
            async with self._model_lock:
                # a session may have left its slot (detached, offloaded, migrated) while we waited for the lock
                batch[:] = [s for s in batch if self.sessions.get(s.session_id) is s and not s.offloaded]
                if not batch:
                    return
                ready_s = [s.ready_since_s or started for s in batch]
                work = asyncio.ensure_future(asyncio.to_thread(
                    self._generate_and_encode, batch, lambda item: loop.call_soon_threadsafe(encoded.put_nowait, item)
                ))
                series = worker_series(self._worker_id, self._model_name)
                for _ in batch:  # each chunk goes out as soon as its own frames are encoded
                    item = await encoded.get()
                    if isinstance(item, BaseException):
                        await work  # raises what the model thread raised
                        raise item
                    session = batch[item.index]
                    queue_ms = (started - ready_s[item.index]) * 1e3
                    timings = {
                        "ready_at_unix_ms": started_wall_ms - queue_ms, "queue_ms": queue_ms,
                        "model_ms": item.model_ms, "encode_ms": item.encode_wait_ms, "batch": float(len(batch)),
                    }
                    deadline = session.deadline_ms(item.output.chunk_index)
                    if deadline is not None:
                        timings["due_unix_ms"] = deadline
                    session.record(EncodedChunk(item.output.chunk_index, item.output.first_frame, item.frames,
                                                timings))
                    series.observe_chunk(queue_ms / 1e3, self._clock() - ready_s[item.index])
                    await self._flush(session)
                done = await work
            for session in batch:
                session.ready_since_s = done.encoded_at_s if session.wants_generation() else None
        self._batch_samples.append((len(batch), done.model_ms + done.encode_ms))
        self._batch_cost.observe(len(batch), done.model_ms + done.encode_ms)
        series.observe_batch(len(batch))
        if self.hooks is not None:  # every chunk of the batch is recorded: a boundary for all of them
            self.hooks.after_batch(batch, done.exported)

    def _generate_and_encode(self, batch: list[ResidentSession],
                             deliver: Callable[[_Encoded | BaseException], object]) -> _BatchDone:
        """Runs on a worker thread: the batched forward, then each session's frames, handed to ``deliver`` one by
        one so the first chunk travels while the rest encode (a failure is handed over too, so the loop waiting
        for the next chunk hears of it), then the states due a snapshot, copied while the thread holds the model
        anyway rather than by a task that would queue for the model lock between batches."""
        try:
            return self._forward_and_encode(batch, deliver)
        except BaseException as exc:
            deliver(exc)
            raise

    def _forward_and_encode(self, batch: list[ResidentSession],
                            deliver: Callable[[_Encoded | BaseException], object]) -> _BatchDone:
        for session in batch:
            prompt = session.prompt_for(session.next_seq)
            if prompt != session.active_prompt:
                self._model.set_prompt(session.handle, prompt)
                session.active_prompt = prompt
        t0 = time.perf_counter()
        with span("model.forward"):
            outputs = self._model.generate([s.handle for s in batch])
        t1 = time.perf_counter()
        model_ms = (t1 - t0) * 1e3
        with span("encode"):
            for index, (output, session) in enumerate(zip(outputs, batch, strict=True)):
                silent = output.chunk_index < session.silent_until
                frames = [] if silent else self._encoder.encode_frames(output.frames)
                deliver(_Encoded(index, output, frames, model_ms, (time.perf_counter() - t1) * 1e3))
        encode_ms = (time.perf_counter() - t1) * 1e3
        encoded_at_s = self._clock()
        exported: dict[str, Mapping[str, torch.Tensor]] = {}
        if self.hooks is not None:
            for output, session in zip(outputs, batch, strict=True):
                chunks_done = output.chunk_index + 1
                if chunks_done > session.silent_until and self.hooks.snapshot_due(session.session_id, chunks_done):
                    exported[session.session_id] = self._model.export_state(session.handle)
        return _BatchDone(model_ms, encode_ms, encoded_at_s, exported)

    async def _flush(self, session: ResidentSession) -> None:
        for chunk in session.sendable():
            header = ChunkHeader(
                session_id=session.session_id, epoch=session.epoch, seq=chunk.seq, first_frame=chunk.first_frame,
                width=self._width, height=self._height, frame_sizes=tuple(len(f) for f in chunk.frames),
                timings_ms={**chunk.timings_ms, "sent_at_unix_ms": time.time() * 1e3}, worker_id=self._worker_id,
            )
            await self._emit(session.session_id, pack_chunk(header, chunk.frames))

    # --- helpers ----------------------------------------------------------------------------------------------

    def _fenced(self, session_id: str, epoch: int) -> ResidentSession:
        session = self.sessions.get(session_id)
        if session is None:
            raise UnknownSession(f"session {session_id} is not resident on worker {self._worker_id}")
        if epoch < session.epoch:
            raise StaleEpoch(f"epoch {epoch} of {session_id} is older than the resident epoch {session.epoch}")
        return session

    def _wake(self, session: ResidentSession) -> None:
        if session.wants_generation() and session.ready_since_s is None:
            session.ready_since_s = self._clock()
        self._work.set()

    async def _rewind(self, session: ResidentSession, seq: int) -> None:
        """A resend older than the replay buffer: rebuild the state and regenerate silently up to ``seq``."""
        log.warning("event=rewind session=%s from_seq=%d next_seq=%d", session.session_id, seq, session.next_seq)
        msg = AttachSession(
            session_id=session.session_id, epoch=session.epoch, seed=session.seed, model=self._model_name,
            next_seq=seq, prompts=tuple(session.prompts),
        )
        await self._release(session)
        await self.attach(msg)

    async def _ensure_resident(self, session: ResidentSession) -> None:
        # Ask the hooks even when the session looks resident: an offload may be copying it out right now, and
        # the hooks decide under the session's lock, after that copy, whether a restore is needed.
        if self.hooks is not None:
            await self.hooks.ensure_resident(session)

    async def _release(self, session: ResidentSession) -> None:
        self.sessions.pop(session.session_id, None)
        if session.offloaded and self.hooks is not None:
            await self.hooks.discard(session)
            return
        async with self._model_lock:  # a batch running this session finishes first; then the slot is free
            self._model.release(session.handle)  # bookkeeping only: a thread hop here would stall the next batch
