"""Apply a plan to a snapshot, as a runner does once the actions have been carried out.

The live runner calls it after each action succeeds; tests and benchmarks use it to play plans forward. It
checks each action against the snapshot and raises ``SnapshotError`` for one that cannot apply (a placement
on a full or draining GPU, a removal of a GPU that still holds sessions), so a policy bug surfaces at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import replace

from services.scheduler.policy.actions import AddGpus, DrainGpu, Migrate, Offload, Place, Plan, RemoveGpu, Restore
from services.scheduler.policy.cost_models import LatencyModel
from services.scheduler.policy.snapshot import ClusterSnapshot, GpuView, SessionView, SnapshotError


def apply_plan(
    snapshot: ClusterSnapshot,
    plan: Plan,
    now_s: float,
    provisioning_delay_s: float,
    latency: LatencyModel,
    new_gpu_ids: Iterator[str] | None = None,
) -> None:
    """Mutate ``snapshot`` to the state after ``plan``; new GPUs are ready ``provisioning_delay_s`` from now."""
    ids = new_gpu_ids or (f"new-{n}" for n in itertools.count())
    for action in plan.actions:
        if isinstance(action, Offload):
            s = _session(snapshot, action.session_id)
            if s.active or s.gpu_id != action.gpu_id:
                raise SnapshotError(f"cannot offload {s.session_id!r}: active or not on {action.gpu_id!r}")
            snapshot.upsert_session(replace(s, active=False, gpu_id=None, offloaded=True))
        elif isinstance(action, (Place, Restore)):
            s = _session(snapshot, action.session_id)
            _check_target(snapshot, action.gpu_id, now_s)
            if s.gpu_id is not None or not s.active:
                raise SnapshotError(f"cannot place {s.session_id!r}: idle or already on {s.gpu_id!r}")
            snapshot.upsert_session(replace(s, gpu_id=action.gpu_id, offloaded=False, waiting_since_s=None))
        elif isinstance(action, Migrate):
            s = _session(snapshot, action.session_id)
            if s.gpu_id != action.source_gpu_id:
                raise SnapshotError(f"cannot migrate {s.session_id!r}: not on {action.source_gpu_id!r}")
            _check_target(snapshot, action.target_gpu_id, now_s)
            snapshot.upsert_session(replace(s, gpu_id=action.target_gpu_id, last_migrated_at_s=now_s))
        elif isinstance(action, AddGpus):
            capacity = latency.curve(action.kind).capacity
            for _ in range(action.count):
                snapshot.upsert_gpu(GpuView(next(ids), action.kind, capacity, now_s + provisioning_delay_s,
                                            billed_since_s=now_s))
        elif isinstance(action, DrainGpu):
            g = snapshot.gpus.get(action.gpu_id)
            if g is None:
                raise SnapshotError(f"cannot drain unknown GPU {action.gpu_id!r}")
            snapshot.upsert_gpu(replace(g, draining=True))
        elif isinstance(action, RemoveGpu):
            snapshot.remove_gpu(action.gpu_id)


def _session(snapshot: ClusterSnapshot, session_id: str) -> SessionView:
    session = snapshot.sessions.get(session_id)
    if session is None:
        raise SnapshotError(f"plan names unknown session {session_id!r}")
    return session


def _check_target(snapshot: ClusterSnapshot, gpu_id: str, now_s: float) -> None:
    gpu = snapshot.gpus.get(gpu_id)
    if gpu is None or gpu.draining or gpu.ready_at_s > now_s:
        raise SnapshotError(f"GPU {gpu_id!r} is missing, draining or not ready at {now_s}")
