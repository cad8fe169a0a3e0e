"""Benchmark of the session-state path: offload/restore vs a raw copy, migration transfer vs a raw gloo send/recv,
and the migration pause with and without pre-copy for 10 MB, 100 MB and 1 GB states.

Run: ``.venv/bin/python -m bench.state`` (about 1-2 minutes on 2 cores). Writes bench/results/state.json.

Definitions. A ratio is the best raw time / our best time for the same bytes over N interleaved runs, so 1.0
means no overhead; GB/s figures are medians. Transfer time runs from the source's call to
``SourceMigration.begin`` to the target's bulk frame being complete (one monotonic clock, shared by the two local
processes). The pause runs from the chunk boundary where the source stops the session to the moment ownership
has moved (target imported, COMMIT sent); the target's import adopts the received buffers (what a device copy
at HBM speed costs on a GPU, ~1 ms per GB, which a CPU stand-in cannot show) and receives into memory reserved
before the migration, as a target's reservation would be. The session keeps making a chunk every ``--chunk-ms``
during the pre-copy; the final delta is the rows of those chunks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

from services.gpu_worker.migration.precopy import SourceMigration, TargetMigration
from services.gpu_worker.migration.state_machine import MigrationPhase, MigrationStateMachine
from services.gpu_worker.migration.transport import TransferListener, connect
from services.gpu_worker.model.interface import SessionHandle
from services.gpu_worker.state.offload import SessionStateManager
from services.gpu_worker.state.packing import plan_manifest
from services.gpu_worker.state.synthetic import SyntheticShape, SyntheticStateModel

CPU = torch.device("cpu")
HOST = "127.0.0.1"
MB = 1_000_000
LINK_TIMEOUT_S = 120.0
GEOMETRY = {"layers": 30, "heads": 12, "head_dim": 128, "sink_rows": 4, "rows_per_chunk": 4, "prompt_tokens": 8}
RESULTS = Path(__file__).parent / "results" / "state.json"


def shape_of(state_mb: int) -> SyntheticShape:
    return SyntheticShape.of_size(state_mb * MB, **GEOMETRY)


# ---- offload / restore -------------------------------------------------------------------------------------


def measure_offload_restore(state_mb: int, repeats: int) -> dict[str, float]:
    """Ours vs ``copy_`` of the same exported tensors into warm, preallocated tensors, interleaved pairwise."""
    model = SyntheticStateModel(shape_of(state_mb), slots=2, device=CPU)
    handle = model.new_session("bench", "a prompt", seed=1)
    manager = SessionStateManager(model, device=CPU, device_budget_bytes=1 << 40, host_budget_bytes=1 << 40)
    handle = manager.restore(manager.offload(handle))  # warm the host pool and the slot memory
    state_bytes = manager.offload(handle).nbytes
    handle = manager.restore(manager.host_state("bench"))
    destinations = {name: torch.zeros_like(t) for name, t in model.export_state(handle).items()}
    raw_s, offload_s, restore_s = [], [], []
    for _ in range(repeats):
        exported = model.export_state(handle)
        raw_s.append(_timed(lambda state=exported: [destinations[name].copy_(t) for name, t in state.items()]))
        started = time.perf_counter()
        host_state = manager.offload(handle)
        offload_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        handle = manager.restore(host_state)
        restore_s.append(time.perf_counter() - started)
    return {
        "state_bytes": state_bytes,
        "raw_copy_gbps": state_bytes / statistics.median(raw_s) / 1e9,
        "offload_gbps": state_bytes / statistics.median(offload_s) / 1e9,
        "restore_gbps": state_bytes / statistics.median(restore_s) / 1e9,
        "offload_ratio": _best_ratio(raw_s, offload_s),
        "restore_ratio": _best_ratio(raw_s, restore_s),
    }


# ---- the target process ------------------------------------------------------------------------------------


def target_main(conn: Connection, threads: int) -> None:
    """Serve commands from the bench: raw receives, or whole migrations into a fresh model."""
    torch.set_num_threads(threads)
    while (command := conn.recv()) is not None:
        kind, args = command
        if kind == "raw":
            _serve_raw(conn, **args)
        else:
            _serve_migration(conn, **args)


def _serve_raw(conn: Connection, nbytes: int) -> None:
    store = dist.TCPStore(HOST, 0, 2, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=LINK_TIMEOUT_S))
    buffer = torch.zeros(nbytes, dtype=torch.uint8)  # warm before the sender starts its clock
    conn.send(store.port)
    group = _raw_group(store, rank=0)
    group.recv([buffer], 1, 0).wait()
    conn.send(time.monotonic())
    group.shutdown()


def _serve_migration(conn: Connection, shape: dict[str, Any], migration_id: str) -> None:
    model = SyntheticStateModel(SyntheticShape(**shape), slots=1, device=CPU, adopt_on_import=True)
    allocate = _reserved_allocator(model)
    listener = TransferListener(HOST, 0, timeout_s=LINK_TIMEOUT_S)
    conn.send(listener.port)
    link = listener.accept(migration_id, CPU)
    machine = MigrationStateMachine(migration_id, timeout_s=LINK_TIMEOUT_S)
    target = TargetMigration(link, model, machine, session_id="bench", allocate=allocate, max_state_bytes=1 << 40)
    handle = target.receive()
    chunk = model.generate([handle])[0]
    model.release(handle)
    conn.send({"history": [(phase.value, at) for phase, at in machine.history], "chunk": chunk.chunk_index})


def _reserved_allocator(model: SyntheticStateModel) -> Callable[[torch.dtype, int], torch.Tensor]:
    """Receive buffers made and touched before the migration (the target's reservation), by (dtype, numel)."""
    layout_only = SyntheticStateModel(model.shape, slots=1, device=torch.device("meta"))
    manifest = plan_manifest(layout_only.export_state(layout_only.new_session("probe", "a prompt", seed=0)))
    reserved: dict[tuple[torch.dtype, int], list[torch.Tensor]] = {}
    for spec in manifest.buffers:
        reserved.setdefault((spec.dtype, spec.numel), []).append(torch.zeros(spec.numel, dtype=spec.dtype))

    def allocate(dtype: torch.dtype, numel: int) -> torch.Tensor:
        ready = reserved.get((dtype, numel))
        return ready.pop() if ready else torch.empty(numel, dtype=dtype)

    return allocate


def _raw_group(store: dist.Store, rank: int) -> dist.ProcessGroup:
    options = dist.ProcessGroupGloo._Options()
    options._timeout = datetime.timedelta(seconds=LINK_TIMEOUT_S)
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=HOST)]
    return dist.ProcessGroupGloo(dist.PrefixStore("raw", store), rank, 2, options)


# ---- the source side ---------------------------------------------------------------------------------------


class BenchSession:
    """A synthetic session on the source that generates a chunk every ``chunk_s`` (the sleep stands for GPU time)."""

    def __init__(self, state_mb: int, chunk_s: float) -> None:
        self.model = SyntheticStateModel(shape_of(state_mb), slots=1, device=CPU)
        self.handle: SessionHandle = self.model.new_session("bench", "a prompt", seed=1)
        self.chunk_s = chunk_s
        self.chunks_done = 0

    def generate_chunk(self) -> None:
        self.model.generate([self.handle])
        self.chunks_done += 1
        time.sleep(self.chunk_s)


def migrate(conn: Connection, session: BenchSession, *, precopy: bool, migration_id: str) -> dict[str, float]:
    """One migration of ``session`` to the target process; returns its pause and transfer times."""
    conn.send(("migrate", {"shape": asdict(session.model.shape), "migration_id": migration_id}))
    link = connect(HOST, conn.recv(), transfer_id=migration_id, device=CPU, timeout_s=LINK_TIMEOUT_S)
    machine = MigrationStateMachine(migration_id, timeout_s=LINK_TIMEOUT_S)
    source = SourceMigration(link, session.model, session.handle, machine, chunks_done=lambda: session.chunks_done)
    chunks_before = session.chunks_done
    if precopy:
        started = time.monotonic()
        source.begin()
        with ThreadPoolExecutor(max_workers=1) as sender:
            bulk = sender.submit(source.send_bulk)
            while not bulk.done():
                session.generate_chunk()
            bulk.result()
        paused_at = time.monotonic()
    else:
        paused_at = started = time.monotonic()
        source.begin()
        source.send_bulk()
    source.finish(commit=lambda: None)
    pause_s = time.monotonic() - paused_at
    report = conn.recv()
    bulk_done_at = next(at for phase, at in report["history"] if phase == MigrationPhase.AWAITING_BOUNDARY.value)
    return {"pause_s": pause_s, "transfer_s": bulk_done_at - started,
            "chunks_during_precopy": session.chunks_done - chunks_before}


def measure_raw_transfer(conn: Connection, nbytes: int) -> float:
    """One plain ``send`` of ``nbytes`` on a gloo group made the same way, into a warm buffer on the target."""
    conn.send(("raw", {"nbytes": nbytes}))
    store = dist.TCPStore(HOST, conn.recv(), 2, is_master=False, timeout=datetime.timedelta(seconds=LINK_TIMEOUT_S))
    group = _raw_group(store, rank=1)
    payload = torch.ones(nbytes, dtype=torch.uint8)
    started = time.monotonic()
    group.send([payload], 0, 0).wait()
    elapsed = conn.recv() - started
    group.shutdown()
    return elapsed


def measure_migration(conn: Connection, state_mb: int, repeats: int) -> dict[str, float]:
    """Ours (a whole stop-and-copy migration, bulk phase timed) vs a raw gloo send of the same bytes, interleaved."""
    raw_s, ours_s = [], []
    for attempt in range(repeats):
        session = BenchSession(state_mb, chunk_s=0.0)
        state_bytes = plan_manifest(session.model.export_state(session.handle)).nbytes
        raw_s.append(measure_raw_transfer(conn, state_bytes))
        ours_s.append(migrate(conn, session, precopy=False, migration_id=f"throughput-{attempt}")["transfer_s"])
    return {"state_bytes": state_bytes, "raw_sendrecv_gbps": state_bytes / statistics.median(raw_s) / 1e9,
            "migration_gbps": state_bytes / statistics.median(ours_s) / 1e9,
            "migration_ratio": _best_ratio(raw_s, ours_s)}


def measure_pauses(conn: Connection, sizes_mb: list[int], chunk_s: float, repeats: int) -> dict[str, dict[str, float]]:
    """Median pause per state size and mode; the source generates a few chunks first, as a live session would."""
    pauses: dict[str, dict[str, float]] = {}
    for state_mb in sizes_mb:
        samples: dict[str, list[float]] = {"stop_and_copy": [], "precopy": [], "chunks_during_precopy": []}
        for attempt in range(repeats):
            for mode in ("stop_and_copy", "precopy"):
                session = BenchSession(state_mb, chunk_s)
                for _ in range(3):
                    session.generate_chunk()
                result = migrate(conn, session, precopy=mode == "precopy",
                                 migration_id=f"pause-{state_mb}-{mode}-{attempt}")
                samples[mode].append(result["pause_s"] * 1000)
                if mode == "precopy":
                    samples["chunks_during_precopy"].append(result["chunks_during_precopy"])
        pauses[str(state_mb)] = {name: round(statistics.median(values), 2) for name, values in samples.items()}
    return pauses


# ---- report ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--throughput-mb", type=int, default=256)
    parser.add_argument("--copy-repeats", type=int, default=15, help="offload/restore runs, interleaved with raw")
    parser.add_argument("--repeats", type=int, default=9, help="migration transfer runs, interleaved with raw")
    parser.add_argument("--pause-repeats", type=int, default=3)
    parser.add_argument("--chunk-ms", type=float, default=50.0, help="simulated compute time of one chunk")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads in both processes; more lets OpenMP barriers in small ops wait "
                             "for threads descheduled by other load on a small shared box, swamping short pauses")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    copies = measure_offload_restore(args.throughput_mb, args.copy_repeats)
    context = mp.get_context("spawn")
    ours, theirs = context.Pipe()
    target = context.Process(target=target_main, args=(theirs, args.threads), daemon=True)
    target.start()
    try:
        transfer = measure_migration(ours, args.throughput_mb, args.repeats)
        pauses = measure_pauses(ours, args.sizes_mb, args.chunk_ms / 1000, args.pause_repeats)
    finally:
        ours.send(None)
        target.join(timeout=30)
    results = {
        "offload_ratio": round(copies["offload_ratio"], 3),
        "restore_ratio": round(copies["restore_ratio"], 3),
        "migration_ratio": round(transfer["migration_ratio"], 3),
        "pause_ms": pauses,
        "throughput": {k: round(v, 3) for k, v in {**copies, **transfer}.items()},
        "setup": {"backend": "gloo", "device": "cpu", "throughput_state_mb": args.throughput_mb,
                  "copy_repeats": args.copy_repeats, "repeats": args.repeats, "pause_repeats": args.pause_repeats,
                  "chunk_ms": args.chunk_ms,
                  "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "wall_s": round(time.monotonic() - started, 1)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    _print_table(results)


def _print_table(results: dict[str, Any]) -> None:
    table = Table(title="session state: offload, restore, migration (gloo, CPU)")
    table.add_column("measure")
    table.add_column("ours", justify="right")
    table.add_column("raw", justify="right")
    table.add_column("ratio / note", justify="right")
    figures = results["throughput"]
    table.add_row("offload GB/s", f"{figures['offload_gbps']:.2f}", f"{figures['raw_copy_gbps']:.2f}",
                  f"{results['offload_ratio']:.2f}")
    table.add_row("restore GB/s", f"{figures['restore_gbps']:.2f}", f"{figures['raw_copy_gbps']:.2f}",
                  f"{results['restore_ratio']:.2f}")
    table.add_row("migration GB/s", f"{figures['migration_gbps']:.2f}", f"{figures['raw_sendrecv_gbps']:.2f}",
                  f"{results['migration_ratio']:.2f}")
    for state_mb, row in results["pause_ms"].items():
        table.add_row(f"pause {state_mb} MB (ms)", f"{row['precopy']:.1f} pre-copy",
                      f"{row['stop_and_copy']:.1f} stop+copy", f"{row['chunks_during_precopy']:.0f} chunks kept going")
    Console().print(table)


def _best_ratio(raw_s: list[float], ours_s: list[float]) -> float:
    """Best raw time over our best time (as timeit does): other processes' load only ever adds time, so the
    fastest of N interleaved runs is the least disturbed estimate of each."""
    return min(raw_s) / min(ours_s)


def _timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
