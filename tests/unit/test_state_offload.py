"""The session-state manager: offload to host, restore, budgets and spilling, on the CPU path."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from services.gpu_worker.model.interface import SessionHandle
from services.gpu_worker.state.errors import DeviceBudgetExceeded, HostBudgetExceeded, NoHostState, StateError
from services.gpu_worker.state.host_pool import HostBufferPool
from services.gpu_worker.state.offload import Residency, SessionStateManager
from services.gpu_worker.state.packing import StateManifest
from services.gpu_worker.state.synthetic import SyntheticShape, SyntheticStateModel
from tests.synthetic_models import load_tiny

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


SHAPE = SyntheticShape(layers=2, heads=2, head_dim=16, rows=40, rows_per_chunk=3)


class DictSpillTarget:
    """Keeps copies, as a durable store would (the manager recycles the buffers it passed)."""

    def __init__(self) -> None:
        self.stored: dict[str, tuple[StateManifest, list[torch.Tensor]]] = {}

    def put(self, session_id: str, manifest: StateManifest, buffers: Sequence[torch.Tensor]) -> None:
        self.stored[session_id] = (manifest, [buffer.clone() for buffer in buffers])

    def get(self, session_id: str) -> tuple[StateManifest, list[torch.Tensor]]:
        return self.stored[session_id]


def _frames(model: SyntheticStateModel, handle: SessionHandle, chunks: int) -> list[torch.Tensor]:
    return [model.generate([handle])[0].frames for _ in range(chunks)]


def _state_bytes(model: SyntheticStateModel, handle: SessionHandle) -> int:
    return sum(t.numel() * t.element_size() for t in model.export_state(handle).values())


def _manager(model: SyntheticStateModel, *, host_budget_bytes: int = 1 << 30, device_budget_bytes: int = 1 << 30,
             spill_target: DictSpillTarget | None = None, pool: HostBufferPool | None = None) -> SessionStateManager:
    return SessionStateManager(model, device=CPU, device_budget_bytes=device_budget_bytes,
                               host_budget_bytes=host_budget_bytes, spill_target=spill_target, pool=pool)


def test_a_restored_session_continues_exactly_like_one_that_never_left() -> None:
    model, reference = SyntheticStateModel(SHAPE, slots=2, device=CPU), SyntheticStateModel(SHAPE, slots=2, device=CPU)
    handle, unmoved = model.new_session("s", "a fox", seed=4), reference.new_session("s", "a fox", seed=4)
    _frames(model, handle, 5), _frames(reference, unmoved, 5)
    manager = _manager(model)
    handle = manager.restore(manager.offload(handle))
    for ours, theirs in zip(_frames(model, handle, 20), _frames(reference, unmoved, 20), strict=True):
        assert torch.equal(ours, theirs)


def test_offload_frees_the_slot_and_the_device_budget_and_restore_takes_them_back() -> None:
    model = SyntheticStateModel(SHAPE, slots=1, device=CPU)
    handle = model.new_session("s", "a fox", seed=1)
    manager = _manager(model)
    manager.claim_device("s", _state_bytes(model, handle))
    state = manager.offload(handle)
    assert manager.device_bytes == 0 and manager.host_bytes == state.nbytes > 0
    other = model.new_session("t", "a cat", seed=2)  # the only slot is free again
    model.release(other)
    manager.restore(state)
    assert manager.device_bytes == state.nbytes and manager.host_bytes == 0
    with pytest.raises(NoHostState):
        manager.host_state("s")


def test_a_restore_past_the_device_budget_is_refused_and_keeps_the_host_state() -> None:
    model = SyntheticStateModel(SHAPE, slots=2, device=CPU)
    handle = model.new_session("s", "a fox", seed=1)
    manager = _manager(model, device_budget_bytes=_state_bytes(model, handle) + 10)
    state = manager.offload(handle)
    manager.claim_device("other", 100)
    with pytest.raises(DeviceBudgetExceeded, match="'s'"):
        manager.restore(state)
    assert manager.host_state("s") is state and manager.device_bytes == 100
    manager.release_device("other")
    manager.restore(state)


def test_past_the_host_budget_the_oldest_offloaded_state_spills_and_restores_from_the_spill_target() -> None:
    model, reference = SyntheticStateModel(SHAPE, slots=3, device=CPU), SyntheticStateModel(SHAPE, slots=1, device=CPU)
    first = model.new_session("first", "a fox", seed=1)
    unmoved = reference.new_session("first", "a fox", seed=1)
    second = model.new_session("second", "a cat", seed=2)
    _frames(model, first, 3), _frames(reference, unmoved, 3)
    spill = DictSpillTarget()
    manager = _manager(model, host_budget_bytes=_state_bytes(model, first) * 3 // 2, spill_target=spill)
    first_state = manager.offload(first)
    manager.offload(second)
    assert first_state.residency is Residency.SPILLED and first_state.buffers == []
    assert set(spill.stored) == {"first"} and manager.host_bytes == manager.host_state("second").nbytes
    restored = manager.restore(first_state)
    assert torch.equal(_frames(model, restored, 1)[0], _frames(reference, unmoved, 1)[0])


def test_with_no_spill_target_a_full_host_budget_refuses_and_leaves_the_session_on_the_device() -> None:
    model = SyntheticStateModel(SHAPE, slots=2, device=CPU)
    first, second = model.new_session("a", "x", seed=1), model.new_session("b", "y", seed=2)
    manager = _manager(model, host_budget_bytes=_state_bytes(model, first) * 3 // 2)
    manager.offload(first)
    with pytest.raises(HostBudgetExceeded, match="no spill target"):
        manager.offload(second)
    assert model.export_state(second)["kv"].numel() > 0  # still resident, slot still owned


def test_discarding_a_closed_session_recycles_its_buffers_and_forgets_it() -> None:
    pool = HostBufferPool(max_cached_bytes=1 << 30, pin_memory=False)
    model = SyntheticStateModel(SHAPE, slots=1, device=CPU)
    manager = _manager(model, pool=pool)
    state = manager.offload(model.new_session("s", "x", seed=1))
    manager.discard("s")
    manager.discard("s")
    assert pool.lent_bytes == 0 and pool.cached_bytes > 0 and manager.host_bytes == 0
    with pytest.raises(NoHostState):
        manager.restore(state)


def test_an_offloaded_state_is_readable_for_a_snapshot_until_it_spills() -> None:
    model = SyntheticStateModel(SHAPE, slots=1, device=CPU)
    manager = _manager(model, spill_target=DictSpillTarget())
    state = manager.offload(model.new_session("s", "x", seed=1))
    assert [b.numel() for b in state.readable_buffers()] == [spec.numel for spec in state.manifest.buffers]
    manager.spill("s")
    with pytest.raises(NoHostState, match="spilled"):
        state.readable_buffers()


def test_offloading_a_session_that_already_has_offloaded_state_is_refused() -> None:
    model = SyntheticStateModel(SHAPE, slots=2, device=CPU)
    manager = _manager(model)
    manager.offload(model.new_session("s", "x", seed=1))
    duplicate = model.new_session("s", "x", seed=1)
    with pytest.raises(StateError, match="already has offloaded state"):
        manager.offload(duplicate)
    assert model.export_state(duplicate)["kv"].numel() > 0


def test_a_model_session_restored_after_an_offload_continues_with_identical_frames() -> None:
    model, reference = load_tiny(max_sessions=1), load_tiny(max_sessions=1)
    handle, unmoved = model.new_session("s", "a red fox", seed=3), reference.new_session("s", "a red fox", seed=3)
    for _ in range(4):
        model.generate([handle]), reference.generate([unmoved])
    manager = SessionStateManager(model, device=CPU, device_budget_bytes=1 << 30, host_budget_bytes=1 << 30)
    state = manager.offload(handle)
    other = model.new_session("other", "a cat", seed=1)  # the slot is reused meanwhile
    model.generate([other])
    model.release(other)
    handle = manager.restore(state)
    for _ in range(3):
        assert torch.equal(model.generate([handle])[0].frames, reference.generate([unmoved])[0].frames)


def test_a_staged_restore_leaves_the_model_free_to_run_until_it_is_finished() -> None:
    model, reference = SyntheticStateModel(SHAPE, slots=2, device=CPU), SyntheticStateModel(SHAPE, slots=2, device=CPU)
    idle, unmoved = model.new_session("idle", "a fox", seed=4), reference.new_session("idle", "a fox", seed=4)
    busy = model.new_session("busy", "a cat", seed=5)
    _frames(model, idle, 3), _frames(reference, unmoved, 3)
    manager = _manager(model)
    staged = manager.stage_restore(manager.offload(idle))
    assert manager.device_bytes == staged.state.nbytes  # the budget is claimed while it is staged
    _frames(model, busy, 2)  # a batch of the other session meanwhile
    handle, landed = manager.finish_restore(staged)
    landed.wait()
    assert manager.host_bytes == 0
    for ours, theirs in zip(_frames(model, handle, 6), _frames(reference, unmoved, 6), strict=True):
        assert torch.equal(ours, theirs)


def test_a_state_discarded_while_its_restore_is_staged_is_not_imported_and_frees_its_budget() -> None:
    model = SyntheticStateModel(SHAPE, slots=2, device=CPU)
    manager = _manager(model)
    staged = manager.stage_restore(manager.offload(model.new_session("s", "a fox", seed=4)))
    manager.discard("s")
    with pytest.raises(NoHostState):
        manager.finish_restore(staged)
    assert manager.device_bytes == 0


class CopyInFlight:
    """A restore's copies as the model reports them: not landed until ``land``."""

    def __init__(self) -> None:
        self.landed = False

    def done(self) -> bool:
        return self.landed

    def wait(self) -> None:
        self.landed = True


def test_a_restores_host_buffers_go_back_to_the_pool_only_once_its_copies_have_landed() -> None:
    model = SyntheticStateModel(SHAPE, slots=3, device=CPU)
    manager = _manager(model)
    handle = model.new_session("s", "a fox", seed=4)
    _frames(model, handle, 2)
    copies = CopyInFlight()
    model.import_landed = lambda _: copies  # type: ignore[method-assign,assignment,return-value]
    state = manager.offload(handle)
    read_by_restore = {buffer.data_ptr() for buffer in state.buffers}
    _, landed = manager.finish_restore(manager.stage_restore(state))
    assert landed is copies and manager.host_bytes == 0
    while_copying = manager.offload(model.new_session("t", "a cat", seed=5))
    assert read_by_restore.isdisjoint(buffer.data_ptr() for buffer in while_copying.buffers)
    copies.wait()
    after_landing = manager.offload(model.new_session("u", "a dog", seed=6))
    assert read_by_restore & {buffer.data_ptr() for buffer in after_landing.buffers}
