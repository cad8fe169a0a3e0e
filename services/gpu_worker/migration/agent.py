"""Both halves of a live migration on a worker, driven by the scheduler's handshake in services.common.control.

Target: ``prepare`` reserves a slot and listens; the receive runs in a thread bounded by the migration's deadline,
so a source that dies frees the reservation when the deadline passes. Source: ``start`` pre-copies while the
session keeps generating, then takes the model lock (every session at a chunk boundary), sends the delta with the
session's cursors and replay buffer, drops the session and reports. The source commits nothing itself: ownership
moves when the scheduler bumps the epoch on the report, and until then no worker sends a chunk of the session.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar, cast

import msgpack
import torch

from services.common.control import (
    MigrationOutcome,
    MigrationReport,
    MigrationTicket,
    PrepareMigration,
    StartMigration,
)
from services.common.errors import InvalidState, TurboServeError, Unavailable
from services.gpu_worker.copies import CopyTicket
from services.gpu_worker.engine import ChunkEngine
from services.gpu_worker.migration.errors import MigrationAborted, MigrationError
from services.gpu_worker.migration.precopy import SourceMigration, TargetMigration
from services.gpu_worker.migration.state_machine import MigrationStateMachine
from services.gpu_worker.migration.transport import PeerLink, TransferListener, connect
from services.gpu_worker.model.interface import SessionHandle, StreamingVideoModel
from services.gpu_worker.session import EncodedChunk, ResidentSession

log = logging.getLogger(__name__)
SESSION_BLOB = "_session"
"""Reserved state name: the session's cursors and replay buffer, msgpack in a fixed-capacity uint8 tensor."""
MIN_BLOB_BYTES = 64 << 10
LOCKED_CALL_TIMEOUT_S = 60.0
T = TypeVar("T")
Publish = Callable[[MigrationReport], Awaitable[None]]


def pack_session(session: ResidentSession, capacity: int) -> torch.Tensor:
    """The session's cursors and replay buffer, length-prefixed, zero-padded to ``capacity`` so the bulk copy and
    the boundary copy have the same shape (the pre-copy protocol re-sends small tensors of unchanged shape)."""
    fields = {
        "epoch": session.epoch, "seed": session.seed, "prompts": [list(p) for p in session.prompts],
        "replay_depth": session.replay_depth, "active_prompt": session.active_prompt, "next_seq": session.next_seq,
        "next_send_seq": session.next_send_seq, "silent_until": session.silent_until,
        "replay": [[c.seq, c.first_frame, c.frames, c.timings_ms] for c in session.replay],
    }
    payload = msgpack.packb(fields, use_bin_type=True)
    if len(payload) + 8 > capacity:
        raise MigrationAborted(f"session blob of {len(payload)} B outgrew its {capacity} B reservation")
    blob = torch.zeros(capacity, dtype=torch.uint8)
    blob[:8] = torch.frombuffer(bytearray(len(payload).to_bytes(8, "little")), dtype=torch.uint8)
    blob[8 : 8 + len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    return blob


def unpack_session(blob: torch.Tensor, session_id: str, handle: SessionHandle) -> ResidentSession:
    raw = blob.cpu().numpy().tobytes()
    fields = msgpack.unpackb(raw[8 : 8 + int.from_bytes(raw[:8], "little")], raw=False)
    session = ResidentSession(
        session_id=session_id, epoch=fields["epoch"], seed=fields["seed"],
        handle=handle, prompts=[(int(s), str(p)) for s, p in fields["prompts"]], replay_depth=fields["replay_depth"],
        next_seq=fields["next_seq"], next_send_seq=fields["next_send_seq"], silent_until=fields["silent_until"],
    )
    session.active_prompt = fields["active_prompt"]
    for seq, first_frame, frames, timings in fields["replay"]:
        session.replay.append(EncodedChunk(seq, first_frame, list(frames), dict(timings)))
    return session


def blob_capacity(session: ResidentSession) -> int:
    """Room for a full replay buffer of chunks twice the largest seen so far, as a power of two."""
    largest = max((sum(len(f) for f in c.frames) for c in session.replay), default=0)
    need = max(MIN_BLOB_BYTES, 2 * session.replay_depth * (largest + 1024))
    return 1 << (need - 1).bit_length()


class _SourceModel:
    """The part of the model a SourceMigration calls, with the session blob added to every export. The caller
    holds the engine's model lock around begin and finish, so calls go straight through."""

    def __init__(self, model: StreamingVideoModel, session: ResidentSession) -> None:
        self._model = model
        self._session = session
        self._capacity = blob_capacity(session)
        self.state_bytes = 0

    def export_state(self, handle: SessionHandle) -> dict[str, torch.Tensor]:
        tensors = self._model.export_state(handle)
        device = next(iter(tensors.values())).device  # NCCL sends device tensors only: the blob goes with the kv
        tensors[SESSION_BLOB] = pack_session(self._session, self._capacity).to(device)
        self.state_bytes = sum(t.nbytes for t in tensors.values())
        return tensors

    def kv_rows_written(self, first_chunk: int, last_chunk: int) -> list[int]:
        return self._model.kv_rows_written(first_chunk, last_chunk)

    def release(self, handle: SessionHandle) -> None:
        self._model.release(handle)


class _TargetModel:
    """The model as the target's receive thread sees it: import and release take the engine's model lock through
    the event loop, so they never overlap a batch; the session blob is kept aside for the engine's record."""

    def __init__(self, model: StreamingVideoModel, engine: ChunkEngine, loop: asyncio.AbstractEventLoop) -> None:
        self._model = model
        self._engine = engine
        self._loop = loop
        self.session_blob: torch.Tensor | None = None

    def import_state(self, session_id: str, tensors: Mapping[str, torch.Tensor]) -> SessionHandle:
        state = dict(tensors)
        blob = state.pop(SESSION_BLOB, None)
        if blob is None:
            raise MigrationAborted(f"migration of {session_id} carried no session blob")
        self.session_blob = blob.clone()
        return self._locked(lambda: self._model.import_state(session_id, state))

    def import_landed(self, handle: SessionHandle) -> CopyTicket:
        return self._model.import_landed(handle)

    def release(self, handle: SessionHandle) -> None:
        self._locked(lambda: self._model.release(handle))

    def _locked(self, call: Callable[[], T]) -> T:
        async def run() -> T:
            async with self._engine.model_lock:
                return await asyncio.to_thread(call)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(LOCKED_CALL_TIMEOUT_S)


class MigrationAgent:
    """Answers PrepareMigration and StartMigration for one worker; keeps a reference to every transfer task."""

    def __init__(
        self,
        engine: ChunkEngine,
        model: StreamingVideoModel,
        publish: Publish,
        *,
        worker_id: str,
        host: str,
        device: torch.device,
        max_state_bytes: int,
        timeout_s: float = 30.0,
    ) -> None:
        self._engine = engine
        self._model = model
        self._publish = publish
        self._worker_id = worker_id
        self._host = host
        self._device = device
        self._max_state_bytes = max_state_bytes
        self._timeout_s = timeout_s
        self._incoming: dict[str, asyncio.Task[None]] = {}
        self._outgoing: dict[str, asyncio.Task[None]] = {}

    def busy(self, session_id: str) -> bool:
        return session_id in self._incoming or session_id in self._outgoing

    async def prepare(self, msg: PrepareMigration) -> MigrationTicket:
        """Reserve a slot and listen; the reservation ends when the receive ends, by success or by deadline."""
        if msg.session_id in self._engine.sessions or self.busy(msg.session_id):
            raise InvalidState(f"session {msg.session_id} is already on or moving to worker {self._worker_id}")
        resident = sum(1 for s in self._engine.sessions.values() if not s.offloaded) + len(self._incoming)
        if resident >= self._model.max_sessions:
            raise Unavailable(f"worker {self._worker_id} has no free slot ({resident} of {self._model.max_sessions})")
        listener = await asyncio.to_thread(TransferListener, self._host, 0, timeout_s=msg.timeout_s)
        task = asyncio.create_task(self._receive(msg, listener), name=f"migrate-in-{msg.session_id}")
        self._incoming[msg.session_id] = task
        task.add_done_callback(lambda _: self._incoming.pop(msg.session_id, None))
        return MigrationTicket(msg.session_id, self._worker_id, listener.host, listener.port)

    async def start(self, msg: StartMigration) -> None:
        """Begin sending the session; the outcome arrives as a MigrationReport, never as this call's answer."""
        session = self._engine.sessions.get(msg.session_id)
        if session is None or session.epoch != msg.epoch:
            raise InvalidState(f"session {msg.session_id} at epoch {msg.epoch} is not resident here")
        if session.offloaded or self.busy(msg.session_id):
            raise InvalidState(f"session {msg.session_id} is offloaded or already moving; move it by snapshot")
        task = asyncio.create_task(self._send(msg, session), name=f"migrate-out-{msg.session_id}")
        self._outgoing[msg.session_id] = task
        task.add_done_callback(lambda _: self._outgoing.pop(msg.session_id, None))

    async def close(self) -> None:
        """Cancel and await every transfer task (their threads end at their deadlines); idempotent."""
        tasks = [*self._incoming.values(), *self._outgoing.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- target ------------------------------------------------------------------------------------------------

    async def _receive(self, msg: PrepareMigration, listener: TransferListener) -> None:
        migration_id = f"{msg.session_id}-{msg.epoch}"
        machine = MigrationStateMachine(migration_id, timeout_s=msg.timeout_s)
        model = _TargetModel(self._model, self._engine, asyncio.get_running_loop())
        try:
            link = await asyncio.to_thread(listener.accept, migration_id, self._device)
            receiver = TargetMigration(
                link, cast(StreamingVideoModel, model), machine, session_id=msg.session_id,
                max_state_bytes=self._max_state_bytes,
                allocate=lambda dtype, numel: torch.empty(numel, dtype=dtype, device=self._device),
            )
            handle = await asyncio.to_thread(receiver.receive)
        except (MigrationError, TurboServeError) as exc:
            log.warning("event=migration_in_failed session=%s detail=%s", msg.session_id, exc)
            return
        assert model.session_blob is not None
        session = unpack_session(model.session_blob, msg.session_id, handle)
        if msg.session_id in self._engine.sessions:  # attached from scratch meanwhile: that copy wins
            await asyncio.to_thread(model.release, handle)
            return
        self._engine.sessions[msg.session_id] = session
        log.info("event=migration_in_done session=%s next_seq=%d replay=%d", msg.session_id, session.next_seq,
                 len(session.replay))

    # --- source ------------------------------------------------------------------------------------------------

    async def _send(self, msg: StartMigration, session: ResidentSession) -> None:
        report = await self._migrate_out(msg, session)
        log.info("event=migration_out session=%s outcome=%s pause_ms=%.1f detail=%s", msg.session_id,
                 report.outcome, report.pause_ms, report.detail)
        await self._publish(report)

    async def _migrate_out(self, msg: StartMigration, session: ResidentSession) -> MigrationReport:
        migration_id = f"{msg.session_id}-{msg.epoch}"
        machine = MigrationStateMachine(migration_id, timeout_s=self._timeout_s)
        started = time.perf_counter()
        pause_ms = 0.0
        model = _SourceModel(self._model, session)
        link: PeerLink | None = None
        try:
            link = await asyncio.to_thread(connect, msg.host, msg.port, transfer_id=migration_id,
                                           device=self._device, timeout_s=self._timeout_s)
            sender = SourceMigration(link, cast(StreamingVideoModel, model), session.handle, machine,
                                     chunks_done=lambda: session.next_seq)
            async with self._engine.model_lock:
                self._check_owned(session, machine)
                await asyncio.to_thread(sender.begin)
            await asyncio.to_thread(sender.send_bulk)
            async with self._engine.model_lock:
                paused = time.perf_counter()
                self._check_owned(session, machine)
                await asyncio.to_thread(sender.finish, lambda: None)
                self._engine.sessions.pop(msg.session_id, None)
                pause_ms = (time.perf_counter() - paused) * 1e3
        except (MigrationError, TurboServeError) as exc:
            if link is not None:
                link.close()  # the target's pending receive fails now instead of at its deadline
            outcome: MigrationOutcome = "aborted" if isinstance(exc, MigrationAborted) else "failed"
            return self._report(msg, outcome, session, detail=f"{type(exc).__name__}: {exc}")
        return self._report(msg, "copied", session, pause_ms=pause_ms, state_bytes=model.state_bytes,
                            transfer_ms=(time.perf_counter() - started) * 1e3)

    def _check_owned(self, session: ResidentSession, machine: MigrationStateMachine) -> None:
        """The session may have been detached, offloaded or rebuilt while we waited for the lock: then stop."""
        if self._engine.sessions.get(session.session_id) is not session or session.offloaded:
            machine.request_abort("the session left this worker's slot during the migration")
            machine.remaining_s()  # runs the rollback and raises MigrationAborted

    def _report(self, msg: StartMigration, outcome: MigrationOutcome, session: ResidentSession, *, detail: str = "",
                pause_ms: float = 0.0, state_bytes: int = 0, transfer_ms: float = 0.0) -> MigrationReport:
        return MigrationReport(
            session_id=msg.session_id, epoch=msg.epoch, source_worker=self._worker_id,
            target_worker=msg.target_worker, outcome=outcome, next_seq=session.next_seq, pause_ms=pause_ms,
            state_bytes=state_bytes, transfer_ms=transfer_ms, detail=detail,
        )

