"""Live migration between two real processes over gloo on localhost: free ports, no global process group."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import pytest
import torch
import torch.distributed as dist

from services.gpu_worker.migration.errors import FrameTooLarge, MigrationAborted, TransferFailed
from services.gpu_worker.migration.precopy import SourceMigration, TargetMigration
from services.gpu_worker.migration.state_machine import MigrationPhase, MigrationStateMachine
from services.gpu_worker.migration.transport import PeerLink, TransferListener, connect
from services.gpu_worker.model.interface import StreamingVideoModel
from services.gpu_worker.state.synthetic import SyntheticShape, SyntheticStateModel
from tests.synthetic_models import load_tiny

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
HOST = "127.0.0.1"
SHAPE = SyntheticShape(layers=4, heads=4, head_dim=32, rows=2048, sink_rows=4, rows_per_chunk=8)  # 4 MiB of KV
SESSIONS = ("a", "b")
TIMEOUT_S = 60.0


def _frames_digest(frames: torch.Tensor) -> str:
    return hashlib.sha256(frames.contiguous().numpy().tobytes()).hexdigest()


class SerialModel:
    """Serialises every call into a model, as the worker's model thread does; models are not thread-safe."""

    def __init__(self, model: StreamingVideoModel) -> None:
        self._model = model
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._model, name)
        if not callable(attribute):
            return attribute

        def serialised(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attribute(*args, **kwargs)

        return serialised




def make_model(kind: str, slots: int) -> StreamingVideoModel:
    if kind == "tiny":
        return load_tiny(max_sessions=slots)
    return SyntheticStateModel(SHAPE, slots=slots, device=CPU)


def _receive(conn: Connection, model: StreamingVideoModel, session_id: str, timeout_s: float) -> dict[str, Any]:
    listener = TransferListener(HOST, 0, timeout_s=timeout_s)
    conn.send((session_id, listener.port))
    machine = MigrationStateMachine(session_id, timeout_s=timeout_s)
    released: list[str] = []
    machine.on_rollback(lambda: released.append("reservation"))
    started = time.monotonic()
    try:
        link = listener.accept(session_id, CPU)
        target = TargetMigration(link, model, machine, session_id=session_id, max_state_bytes=1 << 30,
                                 allocate=lambda dtype, numel: torch.empty(numel, dtype=dtype))
        handle = target.receive()
    except MigrationAborted as exc:
        return {"phase": machine.phase.value, "released": released, "error": str(exc),
                "elapsed_s": time.monotonic() - started}
    return {"phase": machine.phase.value, "released": released,
            "frames": [_frames_digest(model.generate([handle])[0].frames) for _ in range(4)]}


def target_process(conn: Connection, sessions: tuple[str, ...], timeout_s: float, kind: str) -> None:
    """Receive every named session at once, each over its own private group, then report."""
    torch.set_num_threads(1)
    model = SerialModel(make_model(kind, len(sessions)))
    with ThreadPoolExecutor(max_workers=len(sessions)) as executor:
        reports = list(executor.map(lambda sid: _receive(conn, model, sid, timeout_s), sessions))
    conn.send({"reports": reports, "default_group": dist.is_initialized()})


def dying_source_process(port: int) -> None:
    """Send the bulk copy, then die without a word, as a crashed worker would."""
    torch.set_num_threads(1)
    model = make_model("synthetic", 1)
    handle = model.new_session("a", "a fox", seed=5)
    link = connect(HOST, port, transfer_id="a", device=CPU, timeout_s=TIMEOUT_S)
    migration = SourceMigration(link, model, handle, MigrationStateMachine("a", timeout_s=TIMEOUT_S),
                                chunks_done=lambda: 0)
    migration.begin()
    migration.send_bulk()
    os._exit(17)


def _unmigrated_frames(kind: str, session_id: str, seed: int, chunks_before: int) -> list[str]:
    model = make_model(kind, 1)
    handle = model.new_session(session_id, f"prompt {session_id}", seed=seed)
    for _ in range(chunks_before):
        model.generate([handle])
    return [_frames_digest(model.generate([handle])[0].frames) for _ in range(4)]


def _migrate(kind: str, session_id: str, seed: int, port: int) -> int:
    model = make_model(kind, 1)
    handle = model.new_session(session_id, f"prompt {session_id}", seed=seed)
    done = 0

    def generate(chunks: int) -> None:
        nonlocal done
        for _ in range(chunks):
            model.generate([handle])
            done += 1

    generate(3)
    link = connect(HOST, port, transfer_id=session_id, device=CPU, timeout_s=TIMEOUT_S)
    machine = MigrationStateMachine(session_id, timeout_s=TIMEOUT_S)
    migration = SourceMigration(link, model, handle, machine, chunks_done=lambda: done)
    migration.begin()
    generate(2)
    migration.send_bulk()
    generate(3)
    migration.finish(commit=lambda: None)
    assert machine.phase is MigrationPhase.DONE
    return done


@pytest.mark.parametrize("kind", ["synthetic", "tiny"])
def test_two_sessions_migrate_at_once_mid_stream_and_continue_with_the_frames_of_an_unmigrated_run(kind: str) -> None:
    context = mp.get_context("spawn")
    ours, theirs = context.Pipe()
    target = context.Process(target=target_process, args=(theirs, SESSIONS, TIMEOUT_S, kind), daemon=True)
    target.start()
    try:
        ports = dict(ours.recv() for _ in SESSIONS)
        seeds = {"a": 1, "b": 2}
        with ThreadPoolExecutor(max_workers=len(SESSIONS)) as executor:
            chunks = dict(zip(SESSIONS, executor.map(lambda sid: _migrate(kind, sid, seeds[sid], ports[sid]), SESSIONS),
                              strict=True))
        result = ours.recv()
    finally:
        target.join(timeout=TIMEOUT_S)
    assert result["default_group"] is False and not dist.is_initialized()
    for session_id, report in zip(SESSIONS, result["reports"], strict=True):
        assert report["phase"] == "done" and report["released"] == []
        assert report["frames"] == _unmigrated_frames(kind, session_id, seeds[session_id], chunks[session_id])


def test_the_target_frees_its_reservation_soon_after_the_source_process_dies() -> None:
    context = mp.get_context("spawn")
    ours, theirs = context.Pipe()
    target = context.Process(target=target_process, args=(theirs, ("a",), TIMEOUT_S, "synthetic"), daemon=True)
    target.start()
    try:
        _, port = ours.recv()
        source = context.Process(target=dying_source_process, args=(port,), daemon=True)
        source.start()
        source.join(timeout=TIMEOUT_S)
        assert source.exitcode == 17
        report = ours.recv()["reports"][0]
    finally:
        target.join(timeout=TIMEOUT_S)
    assert report["phase"] == "rolled_back" and report["released"] == ["reservation"]
    assert report["elapsed_s"] < TIMEOUT_S / 2  # noticed by the broken connection, not by running out the clock


def test_a_source_that_cannot_reach_the_target_fails_with_a_typed_error() -> None:
    listener = TransferListener(HOST, 0, timeout_s=1.0)
    port = listener.port
    del listener  # nothing listens there any more
    with pytest.raises(TransferFailed, match=str(port)):
        connect(HOST, port, transfer_id="x", device=CPU, timeout_s=1.0)


def _linked_pair(transfer_id: str) -> tuple[PeerLink, PeerLink]:
    """A source and a target link inside this process (two threads stand in for two workers)."""
    listener = TransferListener(HOST, 0, timeout_s=TIMEOUT_S)
    with ThreadPoolExecutor(max_workers=1) as executor:
        accepted = executor.submit(listener.accept, transfer_id, CPU)
        source = connect(HOST, listener.port, transfer_id=transfer_id, device=CPU, timeout_s=TIMEOUT_S)
        return source, accepted.result(timeout=TIMEOUT_S)


def _allocate(dtype: torch.dtype, numel: int) -> torch.Tensor:
    return torch.empty(numel, dtype=dtype)


def test_a_frame_with_a_header_past_the_fixed_block_and_mixed_dtypes_arrives_whole() -> None:
    source, target = _linked_pair("frames")
    header = {"note": "x" * 40_000}  # larger than the fixed header block, so it takes the overflow message
    tensors = [torch.arange(10, dtype=torch.bfloat16), torch.tensor([True, False]), torch.arange(3)]
    with ThreadPoolExecutor(max_workers=1) as executor:
        sent = executor.submit(source.send_frame, header, tensors, timeout_s=TIMEOUT_S)
        received_header, received = target.recv_frame(_allocate, timeout_s=TIMEOUT_S, max_payload_bytes=1 << 20)
        sent.result(timeout=TIMEOUT_S)
    source.close()
    target.close()
    assert received_header == header
    assert all(torch.equal(got, want) for got, want in zip(received, tensors, strict=True))


def test_a_frame_carrying_more_than_the_receiver_allows_is_refused_before_allocating() -> None:
    source, target = _linked_pair("oversized")
    with ThreadPoolExecutor(max_workers=1) as executor:
        pending = executor.submit(source.send_frame, {"kind": "bulk"}, [torch.zeros(1000)], timeout_s=0.5)
        with pytest.raises(FrameTooLarge, match="4000 B"):
            target.recv_frame(lambda dtype, numel: pytest.fail("allocated"), timeout_s=TIMEOUT_S,
                              max_payload_bytes=3999)
        with pytest.raises(TransferFailed):  # nobody takes the tensor: the sender gets a typed error, not a hang
            pending.result(timeout=TIMEOUT_S)
    target.close()
    source.close()
