"""Worker entry point: load the model, then run the engine and its NATS runner until stopped."""

from __future__ import annotations

import asyncio

import torch
from nats.aio.client import Client as NatsClient

from services.common.config import ConfigError
from services.gpu_worker.engine import ChunkEngine, SessionTable
from services.gpu_worker.frames import JpegEncoder
from services.gpu_worker.migration.agent import MigrationAgent
from services.gpu_worker.model import load_model
from services.gpu_worker.runner import WorkerOutbox, WorkerRunner
from services.gpu_worker.settings import WorkerSettings
from services.gpu_worker.state.offload import SessionStateManager
from services.gpu_worker.state.residency import SessionResidency, StoreSpill
from services.state_store.client import SnapshotClient


async def run_worker(settings: WorkerSettings, nc: NatsClient, stop: asyncio.Event) -> None:
    if not settings.model_dir:
        raise ConfigError("TURBOSERVE_MODEL_DIR is not set: point it at the model's published files, or write "
                          "synthetic ones with `turboserve model synth --config tiny DIR`")
    torch.set_num_threads(settings.torch_threads)
    dtype = torch.bfloat16 if settings.device.startswith("cuda") else torch.float32
    model = await asyncio.to_thread(
        load_model, settings.model_dir, settings.model, device=settings.device, dtype=dtype,
        max_sessions=settings.max_resident_sessions, text_device=settings.text_device,
    )
    config = model.config

    outbox = WorkerOutbox(nc)
    table = SessionTable()
    snapshots = SnapshotClient(nc)
    manager = SessionStateManager(
        model, device=torch.device(settings.device), device_budget_bytes=settings.device_state_bytes,
        host_budget_bytes=settings.host_state_bytes,
        spill_target=StoreSpill(table, snapshots, asyncio.get_running_loop()),
    )
    residency = SessionResidency(table, manager, snapshots, every_chunks=settings.snapshot_every_chunks)
    engine = ChunkEngine(
        model, JpegEncoder(settings.jpeg_quality), outbox.chunk, worker_id=settings.worker_id,
        model_name=settings.model, frame_size=(config.width_px, config.height_px), max_batch=settings.max_batch,
        replay_depth=settings.replay_chunks, table=table, hooks=residency,
    )

    migrations = MigrationAgent(
        engine, model, outbox.migration_report, worker_id=settings.worker_id, host=settings.migration_host,
        device=torch.device(settings.device), max_state_bytes=settings.device_state_bytes,
    )
    try:
        await WorkerRunner(settings, nc, engine, residency=residency, migrations=migrations).run(stop)
    finally:
        await migrations.close()
        await residency.close()
