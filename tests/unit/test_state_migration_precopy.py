"""Pre-copy migration end to end over an in-memory link (the real gloo link is in tests/integration)."""

from __future__ import annotations

import queue
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import msgpack
import pytest
import torch

from services.gpu_worker.migration.errors import FrameTooLarge, MigrationAborted, TransferFailed
from services.gpu_worker.migration.precopy import SourceMigration, TargetMigration
from services.gpu_worker.migration.state_machine import MigrationPhase, MigrationStateMachine
from services.gpu_worker.model.interface import SessionHandle
from services.gpu_worker.state.synthetic import SyntheticShape, SyntheticStateModel
from tests.synthetic_models import load_tiny

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


SHAPE = SyntheticShape(layers=2, heads=2, head_dim=16, rows=200, sink_rows=4, rows_per_chunk=3)
Allocate = Callable[[torch.dtype, int], torch.Tensor]


class InMemoryLink:
    """One end of a link made of two queues; copies tensors as a network would. Closing tells the peer."""

    def __init__(self, inbox: queue.Queue[Any], outbox: queue.Queue[Any], drop_kinds: frozenset[str]) -> None:
        self._inbox, self._outbox, self._drop_kinds = inbox, outbox, drop_kinds
        self.sent_headers: list[dict[str, Any]] = []

    @classmethod
    def pair(cls, drop_from_source: frozenset[str] = frozenset()) -> tuple[InMemoryLink, InMemoryLink]:
        to_target: queue.Queue[Any] = queue.Queue()
        to_source: queue.Queue[Any] = queue.Queue()
        return cls(to_source, to_target, drop_from_source), cls(to_target, to_source, frozenset())

    def send_frame(self, header: Mapping[str, Any], tensors: Sequence[torch.Tensor], *, timeout_s: float) -> None:
        self.sent_headers.append(dict(header))
        if header["kind"] not in self._drop_kinds:
            self._outbox.put((msgpack.packb(dict(header)), [t.clone() for t in tensors]))

    def recv_frame(self, allocate: Allocate, *, timeout_s: float,
                   max_payload_bytes: int) -> tuple[dict[str, Any], list[torch.Tensor]]:
        try:
            item = self._inbox.get(timeout=timeout_s)
        except queue.Empty as exc:
            raise TransferFailed(f"recv timed out after {timeout_s:.2f} s") from exc
        if item is None:
            raise TransferFailed("peer closed the link")
        payload, tensors = item
        if sum(t.numel() * t.element_size() for t in tensors) > max_payload_bytes:
            raise FrameTooLarge("payload over the limit")
        received = []
        for tensor in tensors:
            buffer = allocate(tensor.dtype, tensor.numel())
            buffer.copy_(tensor.reshape(-1))
            received.append(buffer)
        return msgpack.unpackb(payload), received

    def close(self) -> None:
        self._outbox.put(None)


class Source:
    def __init__(self) -> None:
        self.model = SyntheticStateModel(SHAPE, slots=1, device=CPU)
        self.handle = self.model.new_session("s", "a fox", seed=11)
        self.chunks_done = 0

    def generate(self, chunks: int) -> list[torch.Tensor]:
        frames = [self.model.generate([self.handle])[0].frames for _ in range(chunks)]
        self.chunks_done += chunks
        return frames


def _reference(chunks: int) -> tuple[SyntheticStateModel, SessionHandle]:
    model = SyntheticStateModel(SHAPE, slots=1, device=CPU)
    handle = model.new_session("s", "a fox", seed=11)
    for _ in range(chunks):
        model.generate([handle])
    return model, handle


def _start_target(executor: ThreadPoolExecutor, link: InMemoryLink, model: SyntheticStateModel,
                  machine: MigrationStateMachine, **options: Any) -> Future[SessionHandle]:
    target = TargetMigration(link, model, machine, session_id="s", max_state_bytes=1 << 24,
                             allocate=lambda dtype, numel: torch.empty(numel, dtype=dtype), **options)
    return executor.submit(target.receive)


def test_a_session_that_kept_generating_during_the_bulk_copy_continues_identically_on_the_target() -> None:
    source, target_model = Source(), SyntheticStateModel(SHAPE, slots=1, device=CPU)
    source.generate(4)
    source_link, target_link = InMemoryLink.pair()
    source_machine, target_machine = MigrationStateMachine("m", timeout_s=30), MigrationStateMachine("m", timeout_s=30)
    with ThreadPoolExecutor(max_workers=1) as executor:
        received = _start_target(executor, target_link, target_model, target_machine)
        migration = SourceMigration(source_link, source.model, source.handle, source_machine,
                                    chunks_done=lambda: source.chunks_done)
        migration.begin()
        source.generate(2)  # written while the bulk is being packed: the live views already hold these rows
        migration.send_bulk()
        source.generate(5)  # written after the bulk left: only the final delta carries these rows
        migration.finish(commit=lambda: None)
        handle = received.result(timeout=30)
    assert source_machine.phase is target_machine.phase is MigrationPhase.DONE
    reference, unmoved = _reference(11)
    for name, tensor in reference.export_state(unmoved).items():
        assert torch.equal(target_model.export_state(handle)[name], tensor), name
    for _ in range(5):
        assert torch.equal(target_model.generate([handle])[0].frames, reference.generate([unmoved])[0].frames)
    with pytest.raises(KeyError):
        source.model.export_state(source.handle)  # the source slot was released


def test_the_target_frees_its_reservation_when_the_source_goes_silent() -> None:
    source, target_model = Source(), SyntheticStateModel(SHAPE, slots=1, device=CPU)
    source_link, target_link = InMemoryLink.pair()
    target_machine = MigrationStateMachine("m", timeout_s=0.3)
    released: list[str] = []
    target_machine.on_rollback(lambda: released.append("reservation"))
    with ThreadPoolExecutor(max_workers=1) as executor:
        received = _start_target(executor, target_link, target_model, target_machine)
        migration = SourceMigration(source_link, source.model, source.handle,
                                    MigrationStateMachine("m", timeout_s=30), chunks_done=lambda: source.chunks_done)
        migration.begin()
        migration.send_bulk()  # ... and the source dies before the boundary
        with pytest.raises(MigrationAborted):
            received.result(timeout=30)
    assert released == ["reservation"] and target_machine.phase is MigrationPhase.ROLLED_BACK


def test_a_failed_commit_rolls_both_sides_back_and_the_source_keeps_the_session() -> None:
    source, target_model = Source(), SyntheticStateModel(SHAPE, slots=1, device=CPU)
    source_link, target_link = InMemoryLink.pair()
    source_machine, target_machine = MigrationStateMachine("m", timeout_s=30), MigrationStateMachine("m", timeout_s=30)
    released: list[str] = []
    target_machine.on_rollback(lambda: released.append("reservation"))

    def commit() -> None:
        raise RuntimeError("epoch moved on: UPDATE matched no row")

    with ThreadPoolExecutor(max_workers=1) as executor:
        received = _start_target(executor, target_link, target_model, target_machine)
        migration = SourceMigration(source_link, source.model, source.handle, source_machine,
                                    chunks_done=lambda: source.chunks_done)
        migration.begin()
        migration.send_bulk()
        with pytest.raises(MigrationAborted, match="epoch moved on"):
            migration.finish(commit)
        with pytest.raises(MigrationAborted, match="source aborted"):
            received.result(timeout=30)
    assert source_machine.phase is MigrationPhase.ABORTED
    assert target_machine.phase is MigrationPhase.ROLLED_BACK and released == ["reservation"]
    assert target_model.max_sessions == 1 and target_model.new_session("u", "x", seed=1).slot == 0  # slot freed
    source.generate(1)  # still live on the source


def test_a_target_that_cannot_import_makes_the_source_abort_with_the_session_still_live() -> None:
    source, full_target = Source(), SyntheticStateModel(SHAPE, slots=1, device=CPU)
    full_target.new_session("other", "x", seed=2)
    source_link, target_link = InMemoryLink.pair()
    source_machine = MigrationStateMachine("m", timeout_s=30)
    with ThreadPoolExecutor(max_workers=1) as executor:
        received = _start_target(executor, target_link, full_target, MigrationStateMachine("m", timeout_s=30))
        migration = SourceMigration(source_link, source.model, source.handle, source_machine,
                                    chunks_done=lambda: source.chunks_done)
        migration.begin()
        migration.send_bulk()
        with pytest.raises(MigrationAborted, match="did not import"):
            migration.finish(commit=lambda: pytest.fail("must not commit"))
        with pytest.raises(MigrationAborted, match="SlotsExhausted"):
            received.result(timeout=30)
    assert source_machine.phase is MigrationPhase.ABORTED
    source.generate(1)


def test_a_lost_commit_frame_is_settled_by_asking_whether_the_commit_landed() -> None:
    source, target_model = Source(), SyntheticStateModel(SHAPE, slots=1, device=CPU)
    source_link, target_link = InMemoryLink.pair(drop_from_source=frozenset({"commit"}))
    committed: list[bool] = []
    target_machine = MigrationStateMachine("m", timeout_s=30)
    with ThreadPoolExecutor(max_workers=1) as executor:
        received = _start_target(executor, target_link, target_model, target_machine,
                                 commit_landed=lambda: bool(committed))
        migration = SourceMigration(source_link, source.model, source.handle,
                                    MigrationStateMachine("m", timeout_s=30), chunks_done=lambda: source.chunks_done)
        migration.begin()
        migration.send_bulk()
        migration.finish(commit=lambda: committed.append(True))  # closing the link wakes the target at once
        handle = received.result(timeout=30)
    assert target_machine.phase is MigrationPhase.DONE
    target_model.generate([handle])


def test_a_bulk_frame_larger_than_the_reservation_is_refused_before_allocating() -> None:
    source, target_model = Source(), SyntheticStateModel(SHAPE, slots=1, device=CPU)
    source_link, target_link = InMemoryLink.pair()
    target_machine = MigrationStateMachine("m", timeout_s=30)
    with ThreadPoolExecutor(max_workers=1) as executor:
        target = TargetMigration(target_link, target_model, target_machine, session_id="s", max_state_bytes=1000,
                                 allocate=lambda dtype, numel: pytest.fail("allocated for an oversized frame"))
        received = executor.submit(target.receive)
        migration = SourceMigration(source_link, source.model, source.handle,
                                    MigrationStateMachine("m", timeout_s=30), chunks_done=lambda: source.chunks_done)
        migration.begin()
        migration.send_bulk()
        with pytest.raises(MigrationAborted, match="FrameTooLarge"):
            received.result(timeout=30)
    assert target_machine.phase is MigrationPhase.ABORTED


def test_tensors_the_caller_vouches_for_are_not_re_sent_at_the_boundary() -> None:
    source, target_model = Source(), SyntheticStateModel(SHAPE, slots=1, device=CPU)
    source_link, target_link = InMemoryLink.pair()
    with ThreadPoolExecutor(max_workers=1) as executor:
        received = _start_target(executor, target_link, target_model, MigrationStateMachine("m", timeout_s=30))
        migration = SourceMigration(source_link, source.model, source.handle, MigrationStateMachine("m", timeout_s=30),
                                    chunks_done=lambda: source.chunks_done, unchanged_names=frozenset({"prompt_cache"}))
        migration.begin()
        migration.send_bulk()
        source.generate(2)
        migration.finish(commit=lambda: None)
        handle = received.result(timeout=30)
    final = next(header for header in source_link.sent_headers if header["kind"] == "final")
    assert sorted(view[0] for view in final["manifest"]["views"]) == ["cursor", "rng"]
    reference, unmoved = _reference(2)
    assert torch.equal(target_model.generate([handle])[0].frames, reference.generate([unmoved])[0].frames)


@pytest.mark.parametrize(("chunks_before", "chunks_during_bulk", "chunks_after_bulk"), [(1, 0, 1), (4, 1, 3)])
def test_a_model_session_with_its_vae_cache_continues_identically_after_a_precopy_migration(
    chunks_before: int, chunks_during_bulk: int, chunks_after_bulk: int
) -> None:
    """(1, 0, 1): the cache is still filling, so the target must widen the bulk kv; (4, 1, 3): the ring wraps."""
    source_model, target_model, reference = (load_tiny(max_sessions=1) for _ in range(3))
    handle = source_model.new_session("s", "a red fox", seed=9)
    unmoved = reference.new_session("s", "a red fox", seed=9)
    done = 0

    def generate(chunks: int) -> None:
        nonlocal done
        for _ in range(chunks):
            source_model.generate([handle])
            reference.generate([unmoved])
            done += 1

    generate(chunks_before)
    source_link, target_link = InMemoryLink.pair()
    with ThreadPoolExecutor(max_workers=1) as executor:
        target = TargetMigration(target_link, target_model, MigrationStateMachine("m", timeout_s=30), session_id="s",
                                 max_state_bytes=1 << 26, allocate=lambda dtype, numel: torch.empty(numel, dtype=dtype))
        received = executor.submit(target.receive)
        migration = SourceMigration(source_link, source_model, handle, MigrationStateMachine("m", timeout_s=30),
                                    chunks_done=lambda: done)
        migration.begin()
        generate(chunks_during_bulk)
        migration.send_bulk()
        generate(chunks_after_bulk)
        migration.finish(commit=lambda: None)
        moved = received.result(timeout=30)
    for _ in range(3):
        assert torch.equal(target_model.generate([moved])[0].frames, reference.generate([unmoved])[0].frames)
