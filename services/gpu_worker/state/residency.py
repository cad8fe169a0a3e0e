"""Where a session's state lives besides its device slot: host memory while idle, the state store every N chunks
and on offload, and back in a slot as soon as credit or an attach needs it.

Invariants: state is exported only while the model is held (periodic snapshots by the batch's own model thread,
right after the batch), so every export is at a chunk boundary and names exactly the chunks it has made; at most
``max_uploads`` snapshots are in flight (a due snapshot is skipped, not queued, when they are; two of one session
may overlap, and the store keeps the newer whichever commits first); an offload acknowledges only once its
snapshot is durable, so any worker can resume the session from the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections import deque
from collections.abc import Mapping, Sequence

import torch

from services.common.control import OffloadSession
from services.common.errors import InvalidState, TurboServeError, Unavailable
from services.common.messages import AttachSession
from services.gpu_worker.copies import CopyTicket
from services.gpu_worker.engine import ImportedState, SessionTable
from services.gpu_worker.session import ResidentSession
from services.gpu_worker.state.offload import SessionStateManager
from services.gpu_worker.state.packing import (
    StateManifest,
    pack_for_send,
    plan_manifest,
    unpack,
)
from services.state_store.client import SnapshotClient
from services.state_store.errors import SessionClosed, StaleSnapshot

log = logging.getLogger(__name__)
StoredState = tuple[StateManifest, list[bytes]]


def to_bytes(buffers: Sequence[torch.Tensor]) -> list[bytes]:
    """Copy buffers (any device) into bytes the state store can upload after the lock is gone."""
    return [t.detach().reshape(-1).view(torch.uint8).cpu().numpy().tobytes() for t in buffers]


def from_snapshot(manifest_wire: object, buffers: Sequence[memoryview]) -> tuple[StateManifest, list[torch.Tensor]]:
    manifest = StateManifest.from_wire(manifest_wire)
    tensors = [torch.frombuffer(buf, dtype=spec.dtype, count=spec.numel) if spec.numel else
               torch.empty(0, dtype=spec.dtype) for buf, spec in zip(buffers, manifest.buffers, strict=True)]
    return manifest, tensors


class SessionResidency:
    """The engine's ResidencyHooks: offload, restore, periodic snapshots and restores from the state store."""

    def __init__(
        self,
        table: SessionTable,
        manager: SessionStateManager,
        snapshots: SnapshotClient,
        *,
        every_chunks: int,
        max_uploads: int = 4,
    ) -> None:
        if every_chunks < 1 or max_uploads < 1:
            raise ValueError(f"every_chunks={every_chunks} and max_uploads={max_uploads} must be >= 1")
        self._table = table
        self._manager = manager
        self._snapshots = snapshots
        self._every_chunks = every_chunks
        self._max_uploads = max_uploads
        self._uploads: set[asyncio.Task[None]] = set()
        self._copy_timers: set[asyncio.Task[None]] = set()
        self._session_locks: dict[str, asyncio.Lock] = {}
        self.state_bytes: dict[str, int] = {}
        """Size of each session's state as last exported here: what a move of it would carry."""
        self._restores: deque[tuple[int, float]] = deque(maxlen=64)

    # --- ResidencyHooks -------------------------------------------------------------------------------------

    async def ensure_resident(self, session: ResidentSession) -> None:
        async with self._lock_for(session.session_id):
            if not session.offloaded:
                return
            state = self._manager.host_state(session.session_id)
            try:
                # a spilled state is read back beside the batches; the import into a slot only issues copies,
                # which the next batch waits for layer by layer on the GPU
                staged = await asyncio.to_thread(self._manager.stage_restore, state)
                try:
                    await asyncio.to_thread(staged.ticket.wait)
                except BaseException:  # cancelled before the import: the host state stays, the claim must not
                    self._manager.release_device(session.session_id)
                    raise
                async with self._table.model_lock:
                    started = time.perf_counter()
                    session.handle, landed = await asyncio.to_thread(self._manager.finish_restore, staged)
            except TurboServeError as exc:
                raise Unavailable(f"cannot restore session {session.session_id}: {exc}") from exc
            session.offloaded = False
            self._time_copy(landed, state.nbytes, started)
            log.info("event=restored session=%s next_seq=%d bytes=%d", session.session_id, session.next_seq,
                     state.nbytes)

    async def fetch_state(self, msg: AttachSession) -> ImportedState | None:
        try:
            snapshot = await self._snapshots.get_latest(msg.session_id)
        except TurboServeError as exc:  # no store: regenerating from chunk 0 is slower but exact
            log.warning("event=snapshot_unreadable session=%s detail=%s", msg.session_id, exc)
            return None
        if snapshot is None or snapshot.chunk_seq + 1 > msg.next_seq:
            return None  # a snapshot past the resume point would skip chunks the client still needs
        manifest, buffers = from_snapshot(snapshot.manifest, snapshot.buffers)
        log.info("event=state_from_snapshot session=%s chunks_done=%d next_seq=%d", msg.session_id,
                 snapshot.chunk_seq + 1, msg.next_seq)
        return ImportedState(unpack(manifest, buffers), snapshot.chunk_seq + 1)

    def snapshot_due(self, session_id: str, chunks_done: int) -> bool:
        """Every ``every_chunks`` chunks, at a phase of its own per session (sessions that started together stream
        in lockstep, and exporting all of them after the same batch would stall the next one), unless too many
        uploads are running."""
        phase = zlib.crc32(session_id.encode()) % self._every_chunks
        if (chunks_done + phase) % self._every_chunks:
            return False
        if len(self._uploads) >= self._max_uploads:
            log.info("event=snapshot_skipped session=%s seq=%d in_flight=%d", session_id, chunks_done - 1,
                     len(self._uploads))
            return False
        return True

    def after_batch(self, batch: Sequence[ResidentSession], exported: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        for session in batch:
            tensors = exported.get(session.session_id)
            if tensors is not None:  # the state after this batch's chunk: name it by that chunk, now
                upload = self._snapshot(session.session_id, session.epoch, session.next_seq - 1, tensors)
                task = asyncio.create_task(upload, name=f"snapshot-{session.session_id}")
                self._uploads.add(task)
                task.add_done_callback(self._uploads.discard)

    async def discard(self, session: ResidentSession) -> None:
        async with self._lock_for(session.session_id):
            await asyncio.to_thread(self._manager.discard, session.session_id)
            self.state_bytes.pop(session.session_id, None)
        self._session_locks.pop(session.session_id, None)

    # --- control ---------------------------------------------------------------------------------------------

    async def offload(self, msg: OffloadSession) -> None:
        """Free the session's slot; acknowledged once its state is in host memory and in the state store."""
        session = self._table.sessions.get(msg.session_id)
        if session is None or msg.epoch < session.epoch:
            raise InvalidState(f"session {msg.session_id} at epoch {msg.epoch} is not resident here")
        async with self._lock_for(session.session_id):
            if session.offloaded:
                return
            if session.wants_generation():
                raise InvalidState(f"session {session.session_id} is generating (credit to {session.credit_up_to})")
            async with self._table.model_lock:
                epoch, chunk_seq = session.epoch, session.next_seq - 1
                host = await asyncio.to_thread(self._manager.offload, session.handle)
                session.offloaded = True
                blobs = await asyncio.to_thread(lambda: to_bytes(host.readable_buffers()))
            self.state_bytes[session.session_id] = host.nbytes
            log.info("event=offloaded session=%s next_seq=%d bytes=%d reason=%r", session.session_id,
                     session.next_seq, host.nbytes, msg.reason)
            if chunk_seq >= 0:
                await self._put(session.session_id, epoch, chunk_seq, host.manifest, blobs)

    def drain_restore_samples(self) -> tuple[tuple[int, float], ...]:
        """(state bytes, ms) of the restores' copies from host memory (import issued to copies landed) since the
        last call: the scheduler fits the resume penalty of an offloaded session to them."""
        samples = tuple(self._restores)
        self._restores.clear()
        return samples

    def offloaded(self) -> tuple[str, ...]:
        return tuple(sid for sid, s in self._table.sessions.items() if s.offloaded)

    async def close(self) -> None:
        """Cancel and await the uploads and copy timings in flight; idempotent."""
        uploads, self._uploads = [*self._uploads, *self._copy_timers], set()
        self._copy_timers = set()
        for task in uploads:
            task.cancel()
        await asyncio.gather(*uploads, return_exceptions=True)

    # --- internals -------------------------------------------------------------------------------------------

    def _time_copy(self, landed: CopyTicket, nbytes: int, started: float) -> None:
        """Record how long a restore's copies took, once they land; the session does not wait for this."""
        if landed.done():
            self._restores.append((nbytes, (time.perf_counter() - started) * 1e3))
            return

        async def wait() -> None:
            await asyncio.to_thread(landed.wait)
            self._restores.append((nbytes, (time.perf_counter() - started) * 1e3))

        task = asyncio.create_task(wait())
        self._copy_timers.add(task)
        task.add_done_callback(self._copy_timers.discard)

    def _lock_for(self, session_id: str) -> asyncio.Lock:
        return self._session_locks.setdefault(session_id, asyncio.Lock())

    async def _snapshot(self, session_id: str, epoch: int, chunk_seq: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Pack and store a state the engine exported after chunk ``chunk_seq`` (its own copy: the slot moves on
        meanwhile)."""
        try:
            manifest, blobs = await asyncio.to_thread(self._pack, session_id, tensors)
            await self._put(session_id, epoch, chunk_seq, manifest, blobs)
        except asyncio.CancelledError:
            raise
        except Exception:  # a lost snapshot only lengthens a later regeneration: log it and keep serving
            log.exception("event=snapshot_failed session=%s", session_id)

    def _pack(self, session_id: str, tensors: Mapping[str, torch.Tensor]) -> StoredState:
        manifest = plan_manifest(tensors)
        self.state_bytes[session_id] = manifest.nbytes
        return manifest, to_bytes(pack_for_send(manifest, tensors))

    async def _put(self, session_id: str, epoch: int, chunk_seq: int, manifest: StateManifest,
                   blobs: list[bytes]) -> None:
        try:
            await self._snapshots.put(session_id, epoch, chunk_seq, manifest.to_wire(), blobs)
        except StaleSnapshot:  # the same or a newer state is already durable: nothing to add
            return
        except SessionClosed:  # closed while this upload was in flight: nobody will resume it
            log.info("event=snapshot_after_close session=%s", session_id)
            return
        log.info("event=snapshot_stored session=%s epoch=%d chunk_seq=%d bytes=%d", session_id, epoch, chunk_seq,
                 sum(len(b) for b in blobs))


class StoreSpill:
    """SpillTarget over the state store, called from the state manager's thread while the event loop runs.

    An offload already stored the state under the session's position, so ``put`` usually only finds it there
    (StaleSnapshot) and returns; if that upload had failed, this one writes it.
    """

    def __init__(self, table: SessionTable, snapshots: SnapshotClient, loop: asyncio.AbstractEventLoop,
                 *, timeout_s: float = 30.0) -> None:
        self._table = table
        self._snapshots = snapshots
        self._loop = loop
        self._timeout_s = timeout_s

    def put(self, session_id: str, manifest: StateManifest, buffers: Sequence[torch.Tensor]) -> None:
        session = self._table.sessions.get(session_id)
        if session is None:
            raise InvalidState(f"cannot spill session {session_id}: it is no longer on this worker")
        call = self._snapshots.put(session_id, session.epoch, max(session.next_seq - 1, 0), manifest.to_wire(),
                                   to_bytes(buffers))
        try:
            asyncio.run_coroutine_threadsafe(call, self._loop).result(self._timeout_s)
        except StaleSnapshot:
            return

    def get(self, session_id: str) -> tuple[StateManifest, list[torch.Tensor]]:
        call = self._snapshots.get_latest(session_id)
        snapshot = asyncio.run_coroutine_threadsafe(call, self._loop).result(self._timeout_s)
        if snapshot is None:
            raise Unavailable(f"session {session_id} was spilled but the state store has no snapshot of it")
        return from_snapshot(snapshot.manifest, snapshot.buffers)
