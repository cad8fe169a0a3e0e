"""The plan a decision returns: frozen actions, each with the reason a log or a span can show verbatim."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Place:
    """Put a session that has no state anywhere (a new one) on a GPU."""

    session_id: str
    gpu_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Restore:
    """Bring an offloaded session's state from host memory back onto a GPU."""

    session_id: str
    gpu_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Offload:
    """Move an idle session's state to host memory, freeing its GPU slot."""

    session_id: str
    gpu_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Migrate:
    """Move a resident session GPU to GPU at a chunk boundary; ``gain_ms`` is the net predicted gain."""

    session_id: str
    source_gpu_id: str
    target_gpu_id: str
    gain_ms: float
    reason: str


@dataclass(frozen=True, slots=True)
class AddGpus:
    """Ask for ``count`` more GPUs of ``kind``; they are not usable before their ``ready_at_s``."""

    kind: str
    count: int
    reason: str


@dataclass(frozen=True, slots=True)
class DrainGpu:
    """Stop placing on a GPU; its sessions move off in this plan or a later one."""

    gpu_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class RemoveGpu:
    """Release a GPU that holds no session (a drained one, or one still provisioning)."""

    gpu_id: str
    reason: str


Action = Place | Restore | Offload | Migrate | AddGpus | DrainGpu | RemoveGpu


@dataclass(frozen=True, slots=True)
class Plan:
    """Actions in execution order: offloads, then drains and their migrations, placements, rebalancing, scaling.

    ``level`` is the workload level the detector saw and ``bottleneck_ms`` the predicted worst per-chunk latency
    after the plan, so a decision log can explain itself without the snapshot.
    """

    actions: tuple[Action, ...]
    level: str
    bottleneck_ms: float
    target_gpus: int
