"""Session state residency on one worker: device budget, offload to host buffers, restore, spill past the host budget.

Invariants: a session counts against the device budget from ``claim_device`` (or a restore) until it is
offloaded or ``release_device`` is called; host bytes count from offload until restore, spill or discard. A
failed offload leaves the session on the device; a failed restore leaves its host state untouched. A restore is
two calls: the slow host-side part (a spilled state read back) runs beside the model's batches, and the import
into a slot only issues copies that the model's next batch waits for layer by layer, on the GPU. Calls are
blocking and serialised by one lock: an asyncio worker runs them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import enum
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from services.common.telemetry.metrics import record_state_bytes
from services.gpu_worker.copies import CopyTicket, StreamCopier
from services.gpu_worker.model.interface import SessionHandle, StreamingVideoModel
from services.gpu_worker.state.errors import DeviceBudgetExceeded, HostBudgetExceeded, NoHostState, StateError
from services.gpu_worker.state.host_pool import HostBufferPool
from services.gpu_worker.state.packing import (
    DEFAULT_OWN_BUFFER_MIN_BYTES,
    StateManifest,
    copy_pairs,
    plan_manifest,
    unpack,
)


class SpillTarget(Protocol):
    """Where state goes past the host budget (the state_store); called from the thread running the manager."""

    def put(self, session_id: str, manifest: StateManifest, buffers: Sequence[torch.Tensor]) -> None:
        """Store the buffers durably before returning; they are recycled right after."""
        ...

    def get(self, session_id: str) -> tuple[StateManifest, list[torch.Tensor]]:
        """The manifest and host buffers last ``put`` for the session."""
        ...


class Residency(enum.Enum):
    HOST = "host"
    SPILLED = "spilled"


@dataclass(slots=True)
class HostState:
    """An offloaded session: its manifest and host buffers (or, once spilled, only where it went)."""

    session_id: str
    manifest: StateManifest
    buffers: list[torch.Tensor]
    ticket: CopyTicket
    residency: Residency = Residency.HOST

    @property
    def nbytes(self) -> int:
        return self.manifest.nbytes

    def readable_buffers(self) -> list[torch.Tensor]:
        """The host buffers once the offload copy has landed (e.g. for a snapshot); never read them before."""
        if self.residency is not Residency.HOST:
            raise NoHostState(f"state of session {self.session_id!r} is {self.residency.value}, not in host memory")
        self.ticket.wait()
        return self.buffers


@dataclass(slots=True)
class StagedRestore:
    """An offloaded state on its way back, its budget claimed: host buffers readable once ``ticket`` lands."""

    state: HostState
    manifest: StateManifest
    buffers: list[torch.Tensor]
    ticket: CopyTicket


class SessionStateManager:
    """Moves sessions' state between the model's device slots and host memory within byte budgets."""

    def __init__(
        self,
        model: StreamingVideoModel,
        *,
        device: torch.device,
        device_budget_bytes: int,
        host_budget_bytes: int,
        pool: HostBufferPool | None = None,
        spill_target: SpillTarget | None = None,
        own_buffer_min_bytes: int = DEFAULT_OWN_BUFFER_MIN_BYTES,
    ) -> None:
        if device_budget_bytes < 0 or host_budget_bytes < 0:
            raise ValueError(f"budgets must be >= 0, got device={device_budget_bytes} host={host_budget_bytes}")
        self._model = model
        self._device = device
        self._device_budget_bytes = device_budget_bytes
        self._host_budget_bytes = host_budget_bytes
        self._pool = pool if pool is not None else HostBufferPool(max_cached_bytes=host_budget_bytes)
        self._spill_target = spill_target
        self._own_buffer_min_bytes = own_buffer_min_bytes
        self._copier = StreamCopier(device)
        self._device_bytes: dict[str, int] = {}
        self._host_states: OrderedDict[str, HostState] = OrderedDict()  # oldest offload first: spill order
        self._landing: list[tuple[CopyTicket, list[torch.Tensor]]] = []  # restores still reading host buffers
        self._lock = threading.RLock()

    @property
    def device_bytes(self) -> int:
        with self._lock:
            return sum(self._device_bytes.values())

    @property
    def host_bytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._host_states.values() if s.residency is Residency.HOST)

    def claim_device(self, session_id: str, state_bytes: int) -> None:
        """Count a session (new, or a migration's reservation) against the device budget, or raise."""
        with self._lock:
            in_use = self.device_bytes - self._device_bytes.get(session_id, 0)
            if in_use + state_bytes > self._device_budget_bytes:
                raise DeviceBudgetExceeded(
                    f"session {session_id!r} needs {state_bytes} B; {in_use} of {self._device_budget_bytes} B "
                    "of the device budget are in use"
                )
            self._device_bytes[session_id] = state_bytes

    def release_device(self, session_id: str) -> None:
        """Stop counting a session on the device (released, migrated away, reservation dropped); idempotent."""
        with self._lock:
            self._device_bytes.pop(session_id, None)

    def host_state(self, session_id: str) -> HostState:
        with self._lock:
            state = self._host_states.get(session_id)
            if state is None:
                raise NoHostState(f"no offloaded state for session {session_id!r} on this worker")
            return state

    def offload(self, handle: SessionHandle) -> HostState:
        """Copy the session's state to host buffers and free its slot; spills older states to make room."""
        with self._lock:
            if handle.session_id in self._host_states:
                raise StateError(f"session {handle.session_id!r} already has offloaded state here; restore or "
                                 "discard it first")
            self._reap_landed()
            tensors = self._model.export_state(handle)
            manifest = plan_manifest(tensors, own_buffer_min_bytes=self._own_buffer_min_bytes)
            self._make_host_room(manifest.nbytes)
            buffers = [self._pool.acquire(spec.dtype, spec.numel) for spec in manifest.buffers]
            try:
                ticket = self._copier.copy(copy_pairs(manifest, tensors, buffers))
            except BaseException:
                for buffer in buffers:
                    self._pool.release(buffer)
                raise
            ticket.order_before(self._copier.compute_stream())  # the freed slot is rewritten only after the copy
            self._model.release(handle)
            self._device_bytes.pop(handle.session_id, None)
            state = HostState(handle.session_id, manifest, buffers, ticket)
            self._host_states[handle.session_id] = state
            record_state_bytes("offload", manifest.nbytes)
            return state

    def restore(self, state: HostState) -> SessionHandle:
        """Rebuild the session in a free slot of this device; returns once its state is all there."""
        handle, landed = self.finish_restore(self.stage_restore(state))
        landed.wait()
        return handle

    def stage_restore(self, state: HostState) -> StagedRestore:
        """What a restore does before it needs the model: claim the device budget and, for a spilled state, read
        it back to host memory. ``ticket`` lands when the host copy is complete (the offload's own copy)."""
        with self._lock:
            if self._host_states.get(state.session_id) is not state:
                raise NoHostState(f"state of session {state.session_id!r} was already restored or discarded")
            self.claim_device(state.session_id, state.nbytes)
            try:
                if state.residency is Residency.SPILLED:
                    if self._spill_target is None:
                        raise NoHostState(f"session {state.session_id!r} was spilled but no spill target is set")
                    manifest, host_buffers = self._spill_target.get(state.session_id)
                    return StagedRestore(state, manifest, host_buffers, CopyTicket.completed())
            except BaseException:
                self._device_bytes.pop(state.session_id, None)
                raise
            return StagedRestore(state, state.manifest, state.buffers, state.ticket)

    def finish_restore(self, staged: StagedRestore) -> tuple[SessionHandle, CopyTicket]:
        """Import a staged state into a slot, straight from host memory: the model streams it in under its next
        batch, layer by layer. Returns the handle and when the copies land; the host buffers go back to the pool
        only then. A failure leaves the host state as it was and the device budget unclaimed."""
        state = staged.state
        with self._lock:
            self._reap_landed()
            try:
                if self._host_states.get(state.session_id) is not state:
                    raise NoHostState(f"state of session {state.session_id!r} was restored or discarded meanwhile")
                staged.ticket.wait()  # the offload's copy into these buffers has finished
                handle = self._model.import_state(state.session_id, unpack(staged.manifest, staged.buffers))
            except BaseException:
                self._device_bytes.pop(state.session_id, None)
                raise
            landed = self._model.import_landed(handle)
            self._host_states.pop(state.session_id, None)
            self._landing.append((landed, state.buffers if state.residency is Residency.HOST else []))
            state.buffers = []
            record_state_bytes("restore", state.nbytes)
            return handle, landed

    def discard(self, session_id: str) -> None:
        """Drop a closed session's offloaded state and recycle its buffers; idempotent."""
        with self._lock:
            state = self._host_states.get(session_id)
            if state is not None:
                self._forget(state)

    def spill(self, session_id: str) -> HostState:
        """Move one offloaded state from host memory to the spill target now."""
        with self._lock:
            state = self.host_state(session_id)
            if state.residency is Residency.HOST:
                self._spill(state)
            return state

    def _make_host_room(self, nbytes: int) -> None:
        if nbytes > self._host_budget_bytes:
            raise HostBudgetExceeded(
                f"a state of {nbytes} B is larger than the host budget {self._host_budget_bytes} B"
            )
        victims = (s for s in list(self._host_states.values()) if s.residency is Residency.HOST)
        while self.host_bytes + nbytes > self._host_budget_bytes:
            victim = next(victims, None)
            if victim is None or self._spill_target is None:
                raise HostBudgetExceeded(
                    f"{self.host_bytes} + {nbytes} B passes the host budget {self._host_budget_bytes} B "
                    + ("and no spill target is set" if self._spill_target is None else "with nothing left to spill")
                )
            self._spill(victim)

    def _spill(self, state: HostState) -> None:
        if self._spill_target is None:
            raise HostBudgetExceeded(f"cannot spill session {state.session_id!r}: no spill target is set")
        self._spill_target.put(state.session_id, state.manifest, state.readable_buffers())
        self._recycle(state)
        state.residency = Residency.SPILLED

    def _reap_landed(self) -> None:
        """Give back to the pool the host buffers of restores whose copies have landed."""
        still_copying = []
        for landed, buffers in self._landing:
            if not landed.done():
                still_copying.append((landed, buffers))
                continue
            for buffer in buffers:
                self._pool.release(buffer)
        self._landing = still_copying

    def _forget(self, state: HostState) -> None:
        if state.residency is Residency.HOST:
            self._recycle(state)
        self._host_states.pop(state.session_id, None)

    def _recycle(self, state: HostState) -> None:
        state.ticket.wait()
        for buffer in state.buffers:
            self._pool.release(buffer)
        state.buffers = []
