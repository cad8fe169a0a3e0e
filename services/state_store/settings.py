"""The state_store's settings, read once from the environment, and the one place that turns a location into a store."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from nats.aio.client import Client as NatsClient

from services.common.config import ConfigError, env_float, env_int, env_str
from services.common.snapshots import StoreLocation
from services.state_store.directory_store import DirectorySnapshotStore
from services.state_store.jetstream_store import JetStreamSnapshotStore
from services.state_store.protocol import SnapshotStore

_BUCKET = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DAY_S = 86_400.0


@dataclass(frozen=True, slots=True)
class StateStoreSettings:
    """Where snapshots live and how long the leftovers of closed or crashed writers survive."""

    backend: Literal["jetstream", "directory"]
    """TURBOSERVE_SNAPSHOT_BACKEND: the JetStream object store (default) or a directory shared with clients."""
    bucket: str
    """TURBOSERVE_SNAPSHOT_BUCKET: object store bucket name ([A-Za-z0-9_-], at most 64); KV buckets derive from it."""
    directory: Path
    """TURBOSERVE_SNAPSHOT_DIR: root of the directory backend."""
    retention_s: float
    """TURBOSERVE_SNAPSHOT_RETENTION_S: how long a closed session's snapshot is kept, in [0, 30 days]."""
    sweep_interval_s: float
    """TURBOSERVE_SNAPSHOT_SWEEP_INTERVAL_S: period of the expiry and orphan sweep, in [0.05, 1 hour]."""
    staging_timeout_s: float
    """TURBOSERVE_SNAPSHOT_STAGING_TIMEOUT_S: staged bytes no head names after this long are a dead writer's
    leftovers and are removed, in [10 s, 1 day]; must exceed the longest upload. A commit must come within half of
    it after its upload (``expiry.COMMIT_WITHIN``)."""
    replicas: int = 1
    """TURBOSERVE_SNAPSHOT_REPLICAS: JetStream copies of every snapshot bucket, in [1, 5]; 3 on a 3-node NATS
    cluster, so losing a node loses no snapshot. Applies when the buckets are created."""

    def __post_init__(self) -> None:
        if not _BUCKET.match(self.bucket):
            raise ConfigError(f"TURBOSERVE_SNAPSHOT_BUCKET={self.bucket!r} must be 1-64 characters of [A-Za-z0-9_-]")

    @classmethod
    def from_env(cls) -> StateStoreSettings:
        backend = env_str("TURBOSERVE_SNAPSHOT_BACKEND", "jetstream")
        if backend not in ("jetstream", "directory"):
            raise ConfigError(f"TURBOSERVE_SNAPSHOT_BACKEND={backend!r} must be 'jetstream' or 'directory'")
        return cls(
            backend="jetstream" if backend == "jetstream" else "directory",
            bucket=env_str("TURBOSERVE_SNAPSHOT_BUCKET", "turboserve_snapshots"),
            directory=Path(env_str("TURBOSERVE_SNAPSHOT_DIR", "/var/lib/turboserve/snapshots")),
            retention_s=env_float("TURBOSERVE_SNAPSHOT_RETENTION_S", 3600.0, low=0.0, high=30 * DAY_S),
            sweep_interval_s=env_float("TURBOSERVE_SNAPSHOT_SWEEP_INTERVAL_S", 30.0, low=0.05, high=3600.0),
            staging_timeout_s=env_float("TURBOSERVE_SNAPSHOT_STAGING_TIMEOUT_S", 900.0, low=10.0, high=DAY_S),
            replicas=env_int("TURBOSERVE_SNAPSHOT_REPLICAS", 1, low=1, high=5),
        )

    @property
    def location(self) -> StoreLocation:
        name = self.bucket if self.backend == "jetstream" else str(self.directory)
        return StoreLocation(backend=self.backend, name=name)


async def open_store(location: StoreLocation, nc: NatsClient, *, create: bool, replicas: int = 1) -> SnapshotStore:
    """The store at ``location``; ``create`` (the service only) makes missing buckets (with ``replicas``
    copies) or directories."""
    if location.backend == "jetstream":
        return await JetStreamSnapshotStore.open(nc, location.name, create=create, replicas=replicas)
    root = Path(location.name)
    if not create and not root.is_dir():
        raise ConfigError(f"snapshot directory {root} is not visible here; the directory backend needs a shared path")
    return DirectorySnapshotStore(root)
