"""Closed-loop scheduling policy for TurboServe: pure (no I/O, no clock reads; time is passed in).

Public API:

* ``ClusterSnapshot`` (``.build(sessions, gpus)``, ``upsert_session``, ``remove_session``, ``upsert_gpu``,
  ``remove_gpu``) of ``SessionView(session_id, state_bytes, active, gpu_id, last_migrated_at_s, offloaded,
  model, waiting_since_s)`` and ``GpuView(gpu_id, kind, capacity, ready_at_s, draining, model, node,
  overflow_slots, billed_since_s)`` rows.
* ``build_controller(name, PolicySetting(...)) -> ClosedLoopController``; names in ``POLICIES`` ("ours",
  "ours_no_overflow", "paper", "fixed", "round_robin", "least_loaded", "by_memory", "ours_no_migration",
  "ours_no_autoscale" ...).
* ``ClosedLoopController.decide(snapshot, now_s) -> Plan``: a tuple of frozen actions (``Place``, ``Restore``,
  ``Offload``, ``Migrate``, ``AddGpus``, ``DrainGpu``, ``RemoveGpu``), each with a ``reason``.
* ``ClosedLoopController.observe_chunk(kind, sessions, chunk_latency_ms)``, ``observe_migration(state_bytes,
  elapsed_ms, same_node)``, ``observe_restore(state_bytes, elapsed_ms)``: measured samples into the fitted models.
* ``apply_plan(snapshot, plan, now_s, provisioning_delay_s, latency)``: the snapshot after a carried-out plan.
"""

from services.scheduler.policy.actions import (
    Action,
    AddGpus,
    DrainGpu,
    Migrate,
    Offload,
    Place,
    Plan,
    RemoveGpu,
    Restore,
)
from services.scheduler.policy.apply import apply_plan
from services.scheduler.policy.controller import ClosedLoopController
from services.scheduler.policy.registry import POLICIES, PolicySetting, UnknownPolicyError, build_controller
from services.scheduler.policy.snapshot import ClusterSnapshot, GpuView, SessionView, SnapshotError

__all__ = [
    "POLICIES",
    "Action",
    "AddGpus",
    "ClosedLoopController",
    "ClusterSnapshot",
    "DrainGpu",
    "GpuView",
    "Migrate",
    "Offload",
    "Place",
    "Plan",
    "PolicySetting",
    "RemoveGpu",
    "Restore",
    "SessionView",
    "SnapshotError",
    "UnknownPolicyError",
    "apply_plan",
    "build_controller",
]
