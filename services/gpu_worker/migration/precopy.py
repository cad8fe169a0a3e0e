"""Live migration with pre-copy: the bulk of the state moves while the session keeps generating, and only the
KV rows written since then plus the small tensors move in the pause at a chunk boundary (Llumnix-style).

Why this is correct even though the bulk is read while chunks are being written: a KV row changed after the
bulk snapshot began belongs to a chunk >= the snapshot's chunk count, so ``kv_rows_written`` names it and the
final frame overwrites it on the target; every other tensor is re-sent whole at the boundary unless the caller
vouches that it did not change (``unchanged_names``, e.g. the prompt cache when no prompt switch happened).

Threads: ``begin`` and ``finish`` call the model (export, release) and run at chunk boundaries on whatever
thread owns the model; ``send_bulk`` and ``TargetMigration.receive`` only block on the link, bounded by the
state machine's deadline, and suit ``asyncio.to_thread``. Every failure rolls back and raises MigrationAborted.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from services.gpu_worker.migration.errors import (
    MigrationAborted,
    MigrationProtocolError,
    PeerAborted,
    TransferFailed,
)
from services.gpu_worker.migration.frames import (
    AbortFrame,
    AckFrame,
    BulkFrame,
    CommitFrame,
    FinalFrame,
    Frame,
    decode,
    encode,
)
from services.gpu_worker.migration.state_machine import MigrationPhase, MigrationStateMachine
from services.gpu_worker.migration.transport import Allocate, FrameLink
from services.gpu_worker.model.interface import SessionHandle, StreamingVideoModel
from services.gpu_worker.state.packing import DEFAULT_OWN_BUFFER_MIN_BYTES, pack_for_send, plan_manifest, unpack

logger = logging.getLogger(__name__)

KV_NAME = "kv"
KV_ROW_DIM = 2  # exported kv is [layers, 2 (k|v), rows, heads, head_dim]
ABORT_NOTICE_TIMEOUT_S = 1.0
FrameT = TypeVar("FrameT", BulkFrame, FinalFrame, CommitFrame)


class SourceMigration:
    """The sending half; the session stays owned here until the target acks and ``commit`` succeeds."""

    def __init__(
        self,
        link: FrameLink,
        model: StreamingVideoModel,
        handle: SessionHandle,
        machine: MigrationStateMachine,
        *,
        chunks_done: Callable[[], int],
        unchanged_names: frozenset[str] = frozenset(),
        own_buffer_min_bytes: int = DEFAULT_OWN_BUFFER_MIN_BYTES,
    ) -> None:
        self._link = link
        self._model = model
        self._handle = handle
        self._machine = machine
        self._chunks_done = chunks_done
        self._unchanged_names = unchanged_names
        self._own_buffer_min_bytes = own_buffer_min_bytes
        self._bulk: dict[str, torch.Tensor] = {}
        self._bulk_chunk = 0

    def begin(self) -> None:
        """At a chunk boundary: take the bulk snapshot (export only; any copy is the model's)."""
        with self._rollback_on_error():
            self._bulk_chunk = self._chunks_done()
            self._bulk = self._model.export_state(self._handle)
            self._machine.advance(MigrationPhase.PRECOPYING)

    def send_bulk(self) -> None:
        """Send the snapshot while the session keeps generating; large tensors go without a packing copy."""
        with self._rollback_on_error():
            manifest = plan_manifest(self._bulk, own_buffer_min_bytes=self._own_buffer_min_bytes)
            buffers = pack_for_send(manifest, self._bulk)
            self._send(BulkFrame(manifest, self._bulk_chunk), buffers)
            self._bulk = {}
            self._machine.advance(MigrationPhase.AWAITING_BOUNDARY)

    def finish(self, commit: Callable[[], None]) -> None:
        """With the session paused at a boundary: send the delta, await the target's import, ``commit`` (the
        epoch bump that moves ownership), tell the target, release the slot here.
        """
        with self._rollback_on_error():
            self._machine.advance(MigrationPhase.FINAL_COPY)
            tensors = self._model.export_state(self._handle)
            last_chunk = self._chunks_done() - 1
            rows = self._rows_since_bulk(last_chunk) if KV_NAME in tensors else []
            resent = {n: t for n, t in tensors.items() if n != KV_NAME and n not in self._unchanged_names}
            manifest = plan_manifest(resent, own_buffer_min_bytes=self._own_buffer_min_bytes)
            parts = pack_for_send(manifest, resent)
            if rows:
                index = torch.tensor(rows, dtype=torch.int64, device=tensors[KV_NAME].device)
                parts = [index, tensors[KV_NAME].index_select(KV_ROW_DIM, index).contiguous(), *parts]
            kv_rows = tensors[KV_NAME].shape[KV_ROW_DIM] if KV_NAME in tensors else -1
            self._send(FinalFrame(self._bulk_chunk, last_chunk, len(rows), kv_rows, manifest), parts)
            self._machine.advance(MigrationPhase.COMMITTING)
            reply = self._recv()
            if not isinstance(reply, AckFrame) or not reply.ok:
                raise MigrationProtocolError(f"target did not import the state: {reply}")
            commit()
        try:
            self._send(CommitFrame(), [])
        except TransferFailed:  # ownership already moved; the target settles it through its commit_landed check
            logger.warning("migration %s: commit landed but the COMMIT frame was lost", self._machine.migration_id)
        self._machine.advance(MigrationPhase.DONE)
        self._model.release(self._handle)
        self._link.close()

    def _rows_since_bulk(self, last_chunk: int) -> list[int]:
        if last_chunk < self._bulk_chunk:
            return []
        return sorted(set(self._model.kv_rows_written(self._bulk_chunk, last_chunk)))

    def _send(self, frame: Frame, tensors: list[torch.Tensor]) -> None:
        header = encode(self._machine.migration_id, frame)
        self._link.send_frame(header, tensors, timeout_s=self._machine.remaining_s())

    def _recv(self) -> Frame:
        header, _ = self._link.recv_frame(_refuse_tensors, timeout_s=self._machine.remaining_s(),
                                          max_payload_bytes=0)
        return decode(self._machine.migration_id, header)

    def _rollback_on_error(self) -> contextlib.AbstractContextManager[None]:
        return _rollback_on_error(self._machine, self._link)


class TargetMigration:
    """The receiving half; the caller has claimed the device reservation and registered its undo.

    Received buffers come from ``allocate`` and go back through ``recycle`` (e.g. a host pool) as soon as
    ``import_state`` returns, so an import that copies asynchronously must have synchronised by then.
    """

    def __init__(
        self,
        link: FrameLink,
        model: StreamingVideoModel,
        machine: MigrationStateMachine,
        *,
        session_id: str,
        allocate: Allocate,
        max_state_bytes: int,
        recycle: Callable[[torch.Tensor], None] | None = None,
        commit_landed: Callable[[], bool] | None = None,
    ) -> None:
        if max_state_bytes < 0:
            raise ValueError(f"max_state_bytes must be >= 0, got {max_state_bytes}")
        self._link = link
        self._model = model
        self._machine = machine
        self._session_id = session_id
        self._allocate = allocate
        self._max_state_bytes = max_state_bytes
        self._recycle = recycle
        self._commit_landed = commit_landed

    def receive(self) -> SessionHandle:
        """Run the whole target side; returns the imported handle once ownership has moved here.

        ``commit_landed`` (reads the epoch in Postgres) settles the one ambiguous case: the target acked but the
        COMMIT frame never came, because the source died right after committing.
        """
        with _rollback_on_error(self._machine, self._link):
            self._machine.advance(MigrationPhase.PRECOPYING)
            bulk, bulk_buffers = self._recv(BulkFrame, self._max_state_bytes)
            tensors = unpack(bulk.manifest, bulk_buffers)
            self._machine.advance(MigrationPhase.AWAITING_BOUNDARY)
            final, final_parts = self._recv(FinalFrame, 2 * self._max_state_bytes)  # rows + their index + smalls
            self._machine.advance(MigrationPhase.FINAL_COPY)
            grown = _grow_kv(tensors, final.kv_rows, self._allocate)
            _apply_final(tensors, final, final_parts)
            handle = self._model.import_state(self._session_id, tensors)
            self._machine.on_rollback(lambda: self._model.release(handle))
            if self._recycle is not None:  # once the import's copies land, the received buffers are free
                self._model.import_landed(handle).wait()
                tensors.clear()
                for buffer in (*bulk_buffers, *final_parts, *grown):
                    self._recycle(buffer)
            self._send(AckFrame(ok=True, reason=""))
            self._machine.advance(MigrationPhase.COMMITTING)
            try:
                self._recv(CommitFrame, 0)
            except TransferFailed:
                if self._commit_landed is None or not self._commit_landed():
                    raise
            self._machine.advance(MigrationPhase.DONE)
        self._link.close()
        return handle

    def _recv(self, expected: type[FrameT], max_payload_bytes: int) -> tuple[FrameT, list[torch.Tensor]]:
        header, tensors = self._link.recv_frame(self._allocate, timeout_s=self._machine.remaining_s(),
                                                max_payload_bytes=max_payload_bytes)
        frame = decode(self._machine.migration_id, header)
        if isinstance(frame, AbortFrame):
            raise PeerAborted(f"source aborted: {frame.reason}")
        if not isinstance(frame, expected):
            raise MigrationProtocolError(f"expected a {expected.__name__}, got {type(frame).__name__}")
        return frame, tensors

    def _send(self, frame: Frame) -> None:
        self._link.send_frame(encode(self._machine.migration_id, frame), [], timeout_s=self._machine.remaining_s())


def _grow_kv(tensors: dict[str, torch.Tensor], kv_rows: int, allocate: Allocate) -> list[torch.Tensor]:
    """If the cache was still filling, widen the bulk kv to the boundary's row count (new rows come as delta).

    Returns the new buffer (to recycle) or nothing. The copy is O(state) but only happens while a session's
    cache is not yet full, which is also when it is small.
    """
    kv = tensors.get(KV_NAME)
    if kv is None or kv_rows == kv.shape[KV_ROW_DIM]:
        return []
    if kv_rows < kv.shape[KV_ROW_DIM]:
        raise MigrationProtocolError(f"kv shrank from {kv.shape[KV_ROW_DIM]} to {kv_rows} rows since the bulk")
    shape = (*kv.shape[:KV_ROW_DIM], kv_rows, *kv.shape[KV_ROW_DIM + 1:])
    buffer = allocate(kv.dtype, _numel(shape))
    grown = buffer.view(shape)
    grown.narrow(KV_ROW_DIM, 0, kv.shape[KV_ROW_DIM]).copy_(kv)
    tensors[KV_NAME] = grown
    return [buffer]


def _apply_final(tensors: dict[str, torch.Tensor], final: FinalFrame, parts: list[torch.Tensor]) -> None:
    """Overwrite the bulk copy with the delta rows, and put the re-sent tensors in whole: they may have grown or
    appeared since the bulk (a filling cache's latents, the VAE cache after a first chunk); the model's import
    checks every name and shape of the result."""
    if final.rows:
        if KV_NAME not in tensors or len(parts) < 2:
            raise MigrationProtocolError("final frame carries kv rows but the bulk has no kv tensor")
        index, rows, parts = parts[0], parts[1], parts[2:]
        kv = tensors[KV_NAME]
        row_shape = (*kv.shape[:KV_ROW_DIM], final.rows, *kv.shape[KV_ROW_DIM + 1:])
        if index.dtype != torch.int64 or index.numel() != final.rows or rows.numel() != _numel(row_shape):
            raise MigrationProtocolError(f"kv delta does not match {final.rows} rows of kv {list(kv.shape)}")
        if int(index.min()) < 0 or int(index.max()) >= kv.shape[KV_ROW_DIM]:
            raise MigrationProtocolError(f"kv delta rows outside [0, {kv.shape[KV_ROW_DIM]})")
        kv.index_copy_(KV_ROW_DIM, index.to(kv.device), rows.to(kv.device).view(row_shape))
    tensors.update(unpack(final.manifest, parts))


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _refuse_tensors(dtype: torch.dtype, numel: int) -> torch.Tensor:
    raise MigrationProtocolError(f"unexpected tensor payload ({dtype}[{numel}]) in a control frame")


@contextlib.contextmanager
def _rollback_on_error(machine: MigrationStateMachine, link: FrameLink) -> Iterator[None]:
    """Any error inside: tell the peer (unless the link or the peer is gone), roll back, raise MigrationAborted."""
    try:
        yield
    except BaseException as exc:
        reason = f"{type(exc).__name__}: {exc}"
        link_broken = isinstance(exc, TransferFailed) and not isinstance(exc, MigrationProtocolError)
        if not link_broken and not isinstance(exc, PeerAborted):
            _tell_peer(machine.migration_id, link, reason)
        machine.fail(reason)
        link.close()
        if isinstance(exc, Exception) and not isinstance(exc, MigrationAborted):
            raise MigrationAborted(f"migration {machine.migration_id} rolled back: {reason}") from exc
        raise


def _tell_peer(migration_id: str, link: FrameLink, reason: str) -> None:
    try:
        link.send_frame(encode(migration_id, AbortFrame(reason)), [], timeout_s=ABORT_NOTICE_TIMEOUT_S)
    except TransferFailed as exc:
        logger.info("migration %s: could not tell the peer about the abort: %s", migration_id, exc)
