"""Fakes of what the scheduler's control loop acts through (StateMover, Provisioner, its NATS side) and a
decider wired the way the runner wires it, on the in-memory store: for unit tests with a fake clock."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from services.common.control import MigrationReport
from services.common.messages import Placement, WorkerHeartbeat
from services.scheduler.actuation import Provisioner
from services.scheduler.control_loop import ControlLoop
from services.scheduler.control_settings import ControlSettings, build_live_controller
from services.scheduler.liveness import WorkerLiveness
from services.scheduler.store.memory import MemoryStore

T0 = datetime(2026, 11, 22, 4, 0, tzinfo=UTC)


# The scaling tests check mechanics (drains, moves, removals) on a few sessions: they pin how much burst headroom
# is kept, so a new choice of the tuned value does not change which worker count they expect.
SCALING_COVERAGE = 0.5


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


class Journal:
    """What the fakes were asked to do, in order, so tests can check the order across them."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, ...]] = []


class FakeMover:
    def __init__(self, store: MemoryStore, journal: Journal, *, fail: bool = False) -> None:
        self.store, self.journal, self.fail = store, journal, fail

    async def offload(self, session_id: str, worker_id: str, epoch: int, reason: str) -> bool:
        self.journal.entries.append(("offload", session_id, worker_id, reason))
        return True

    async def migrate(self, session_id: str, source: str, target: str, epoch: int, reason: str) -> MigrationReport:
        self.journal.entries.append(("migrate", session_id, source, target, reason))
        if self.fail:
            return MigrationReport(session_id, epoch, source, target, "failed", detail="refused")
        row = await self.store.get_session(session_id)
        assert row is not None
        await self.store.move_session(session_id, expected_epoch=epoch, worker_id=target, status=row.status, at=T0)
        return MigrationReport(session_id, epoch, source, target, "copied", pause_ms=30.0, state_bytes=10**6)


class FakeProvisioner:
    """Checks the scale-in invariant at the moment of removal: no open session is left on the worker."""

    def __init__(self, store: MemoryStore, journal: Journal) -> None:
        self.store, self.journal = store, journal
        self.started = 0

    async def scale_out(self, count: int, reason: str) -> Sequence[str]:
        ids = [f"new-{self.started + i + 1}" for i in range(count)]
        self.started += count
        self.journal.entries.append(("scale_out", str(count), reason))
        return ids

    async def remove(self, worker_id: str, reason: str) -> None:
        left = [s.session_id for s in await self.store.list_sessions() if s.worker_id == worker_id]
        assert not left, f"removing {worker_id} would drop {left}"
        self.journal.entries.append(("remove", worker_id, reason))
        await self.store.retire_worker(worker_id, "gone")

    async def parked(self) -> frozenset[str]:
        return frozenset()

    async def close(self) -> None:
        pass


class FakeStatefulSetApi:
    """AppsV1Api's read and strategic-merge patch of one StatefulSet: replicas, annotations, resourceVersion."""

    def __init__(self, replicas: int, name: str = "turboserve-worker", namespace: str = "ts") -> None:
        self.where = (name, namespace)
        self.replicas = replicas
        self.annotations: dict[str, str] = {}
        self.version = 1
        self.patches: list[int] = []

    def read_namespaced_stateful_set(self, name: str, namespace: str, **options: Any) -> Any:
        assert (name, namespace) == self.where and options["_request_timeout"]  # a call without one could hang
        return SimpleNamespace(metadata=SimpleNamespace(annotations=dict(self.annotations) or None,
                                                        resource_version=str(self.version)),
                               spec=SimpleNamespace(replicas=self.replicas))

    def patch_namespaced_stateful_set(self, name: str, namespace: str, body: Any, **options: Any) -> Any:
        assert (name, namespace) == self.where and options["_request_timeout"]
        metadata = body.get("metadata", {})
        if metadata.get("resourceVersion", str(self.version)) != str(self.version):
            raise RuntimeError("(409) Conflict: the object has been modified")
        self.annotations.update(metadata.get("annotations", {}))
        if "spec" in body:
            self.replicas = body["spec"]["replicas"]
            self.patches.append(self.replicas)
        self.version += 1
        return body


class FakeIO:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.placements: list[Placement] = []

    async def publish_placement(self, placement: Placement) -> None:
        self.placements.append(placement)

    async def release(self, worker_id: str, session_id: str, epoch: int) -> None:
        self.journal.entries.append(("release", worker_id, session_id))

    async def drain(self, worker_id: str, reason: str) -> str:
        self.journal.entries.append(("drain", worker_id, reason))
        return "ok"


@dataclass
class Decider:
    """A control loop with its liveness, its fakes and what they were asked to do."""

    loop: ControlLoop
    liveness: WorkerLiveness
    provisioner: FakeProvisioner
    io: FakeIO
    journal: Journal

    async def beat(self, beat: WorkerHeartbeat) -> None:
        """A heartbeat as the runner fans it out."""
        await self.liveness.observe_heartbeat(beat)
        self.loop.observe_heartbeat(beat)


def make_decider(store: MemoryStore, clock: Clock, *, journal: Journal | None = None, fail_moves: bool = False,
                 max_gpus: int = 3,
                 offload_after_s: float = 0.0, scale_in_hold_s: float = 0.0, worker_timeout_s: float = 3.0,
                 wall_clock: object = None, provisioner: Provisioner | None = None,
                 confirm_lead: Callable[[], Awaitable[None]] | None = None) -> Decider:
    """``provisioner``: a real one for the loop to act through in place of the fake (which then records nothing)."""
    settings = ControlSettings(min_gpus=1, max_gpus=max_gpus, scale_in_hold_s=scale_in_hold_s,
                               detector_window_s=10.0, worker_kind="cpu", worker_capacity=4, provision_timeout_s=60.0,
                               burst_coverage=SCALING_COVERAGE)
    journal = journal if journal is not None else Journal()
    fake, io = FakeProvisioner(store, journal), FakeIO(journal)
    wall = wall_clock if callable(wall_clock) else (lambda: T0)
    liveness = WorkerLiveness(store, worker_timeout_s=worker_timeout_s, clock=clock, wall_clock=wall)
    loop = ControlLoop(store, build_live_controller(settings), FakeMover(store, journal, fail=fail_moves),
                       provisioner or fake, io, liveness, control_period_s=60.0, provision_timeout_s=60.0,
                       retire_grace_s=30.0, max_gpus=max_gpus, offload_after_s=offload_after_s,
                       decision_timeout_s=5.0, confirm_lead=confirm_lead, clock=clock, wall_clock=wall)
    return Decider(loop, liveness, fake, io, journal)
