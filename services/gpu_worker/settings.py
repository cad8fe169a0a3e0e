"""Worker settings, parsed once from the environment."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from services.common.config import env_choice, env_float, env_int, env_str
from services.common.subjects import check_token


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    worker_id: str
    """Unique id; becomes a NATS subject token (TURBOSERVE_WORKER_ID, default host-pid)."""
    model: str
    """Model config to serve (TURBOSERVE_MODEL): tiny, self-forcing, causvid or longlive."""
    model_dir: str
    """Directory holding the model's published files (TURBOSERVE_MODEL_DIR; see checkpoint_files)."""
    device: str
    """torch device (TURBOSERVE_DEVICE): cpu, cuda, cuda:1 ..."""
    text_device: str
    """Device of the umT5 text encoder (TURBOSERVE_TEXT_DEVICE, default the DiT's): 11 GB in bf16 that need not
    share the DiT's GPU."""
    kind: str
    """GPU kind reported to the scheduler, which keeps a latency curve per kind (TURBOSERVE_WORKER_KIND)."""
    capacity: int
    """The most sessions the scheduler may place here (TURBOSERVE_WORKER_CAPACITY, 1..64): the ceiling of K."""
    capacity_measured: bool
    """K as this worker's batches show it holds streams in real time, up to ``capacity`` (capacity.py), or
    ``capacity`` as configured (TURBOSERVE_CAPACITY_FROM=measure, the default, or setting)."""
    max_batch: int
    """Most sessions in one forward (TURBOSERVE_MAX_BATCH, default K); 1 gives one-session-at-a-time serving."""
    max_resident_sessions: int
    """Sessions whose state the device holds, idle included (TURBOSERVE_MAX_RESIDENT, >= capacity)."""
    heartbeat_interval_s: float
    """Seconds between heartbeats (TURBOSERVE_HEARTBEAT_S); the scheduler's timeout must be a few of these."""
    replay_chunks: int
    """Encoded chunks kept per session to answer a resend without regenerating (TURBOSERVE_REPLAY_CHUNKS)."""
    jpeg_quality: int
    """JPEG quality of the frames sent to clients (TURBOSERVE_JPEG_QUALITY, 30..95)."""
    snapshot_every_chunks: int
    """An active session's state goes to the state store every this many chunks (TURBOSERVE_SNAPSHOT_EVERY_CHUNKS)."""
    host_state_bytes: int
    """Host memory for offloaded state; past it, state spills to the state store (TURBOSERVE_HOST_STATE_MB)."""
    device_state_bytes: int
    """Device memory for restored session state (TURBOSERVE_DEVICE_STATE_MB)."""
    migration_host: str
    """Address this worker listens on for a migration's rendezvous (TURBOSERVE_MIGRATION_HOST)."""
    torch_threads: int
    node: str
    """The machine this worker's GPU is in (TURBOSERVE_NODE, default the host name): the scheduler prices a
    migration between two workers of one node at the node's GPU link, across nodes at the network's."""
    """Intra-op CPU threads (TURBOSERVE_TORCH_THREADS, default 1): several workers share a small CPU, and
    oversubscribed torch threads made a tiny-model chunk 30x slower on the 2-core CI machine."""

    @classmethod
    def from_env(cls) -> WorkerSettings:
        capacity = env_int("TURBOSERVE_WORKER_CAPACITY", 4, low=1, high=64)
        device = env_str("TURBOSERVE_DEVICE", "cpu")
        return cls(
            worker_id=check_token(
                "worker id", env_str("TURBOSERVE_WORKER_ID", f"{socket.gethostname()}-{os.getpid()}")
            ),
            model=env_str("TURBOSERVE_MODEL", "tiny"),
            model_dir=env_str("TURBOSERVE_MODEL_DIR", ""),
            device=device,
            text_device=env_str("TURBOSERVE_TEXT_DEVICE", device),
            kind=env_str("TURBOSERVE_WORKER_KIND", device.split(":")[0]),
            capacity=capacity,
            node=env_str("TURBOSERVE_NODE", socket.gethostname()),
            capacity_measured=env_choice("TURBOSERVE_CAPACITY_FROM", "measure", ("measure", "setting")) == "measure",
            max_batch=env_int("TURBOSERVE_MAX_BATCH", capacity, low=1, high=256),
            max_resident_sessions=env_int("TURBOSERVE_MAX_RESIDENT", 4 * capacity, low=capacity, high=1024),
            heartbeat_interval_s=env_float("TURBOSERVE_HEARTBEAT_S", 1.0, low=0.05, high=60.0),
            replay_chunks=env_int("TURBOSERVE_REPLAY_CHUNKS", 4, low=1, high=64),
            jpeg_quality=env_int("TURBOSERVE_JPEG_QUALITY", 85, low=30, high=95),
            snapshot_every_chunks=env_int("TURBOSERVE_SNAPSHOT_EVERY_CHUNKS", 16, low=1, high=1_000_000),
            host_state_bytes=env_int("TURBOSERVE_HOST_STATE_MB", 8192, low=1, high=1 << 22) << 20,
            device_state_bytes=env_int("TURBOSERVE_DEVICE_STATE_MB", 65536, low=1, high=1 << 22) << 20,
            migration_host=env_str("TURBOSERVE_MIGRATION_HOST", "127.0.0.1"),
            torch_threads=env_int("TURBOSERVE_TORCH_THREADS", 1, low=1, high=256),
        )
