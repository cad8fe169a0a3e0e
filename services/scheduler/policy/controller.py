"""The closed-loop controller: one stateful object whose ``decide(snapshot, now_s)`` returns a Plan.

It holds what must outlive a decision (the detector window, the scale-in hold: since when fewer GPUs sufficed and
the targets since, the fitted cost models, a placement cursor, the violation budget, the sizing's burst memory)
and nothing else; for the same sequence of inputs it returns the same plans. What takes hours to learn (the budget
and the burst memory) it hands on as plain data (``learnt``), so a scheduler that restarts takes it back
(``relearn``) instead of sizing from its priors. Order inside a decision: offload idle residents, move sessions off
draining GPUs, place waiting sessions, rebalance (at most every ``rebalance_interval_s``), then size the pool from
the post-placement load.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

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
from services.scheduler.policy.autoscale import AutoscalePolicy, Learning
from services.scheduler.policy.billing import Billing
from services.scheduler.policy.budget import ViolationBudget
from services.scheduler.policy.cost_models import LatencyModel, MigrationCostModel, RestoreCostModel
from services.scheduler.policy.detector import WorkloadDetector, WorkloadReading
from services.scheduler.policy.placement import PlacementPolicy
from services.scheduler.policy.rebalance import RebalancePolicy
from services.scheduler.policy.snapshot import ClusterSnapshot, SessionView
from services.scheduler.policy.workspace import RestoreDelay, Workspace

RELIEF_INTERVALS = 8
SEARCH_PER_LEVEL = 32
EVACUATION_TRIES = 4
RELEASE_LEAD_S = 10.0
"""A GPU whose paid time runs out this soon is released now, not at a later decision (the simulator decides at
least this often; the live loop every 2 s), so a surplus GPU never starts an increment it will not use."""
LEARNT_VERSION = 1
"""The shape of ``learnt``'s state; a controller refuses a state of another version."""


class LearntStateError(ValueError):
    """A learnt state this controller cannot take back (another version or shape); it keeps what it had."""


class ControllerConfigError(ValueError):
    """A controller setting no decision can use (a non-positive target, a negative overflow wait or slot count)."""


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    """``scale_kind``: the GPU kind AddGpus asks for; ``consolidate``: scale-in may migrate sessions off the
    GPUs it releases (False: only empty GPUs are released, the no-migration ablation); ``landing_migrations``:
    when a resuming session's first chunk would miss the target (restore time on top of a busy GPU), first move
    one of that GPU's sessions to another GPU where its own migration pause still meets the target, never one
    migrated less than ``migration_cooldown_s`` ago; ``price_migrations``: a move for a landing or a
    consolidation is made only when no chunk it holds up (the mover's, and the next batch on both GPUs, see
    ``Workspace.migration_late_chunks``) misses the target; ``overflow_slots``: how many sessions past its
    latency capacity a GPU may take (within its own ``overflow_slots``) rather than leave a session waiting for
    a GPU still provisioning, once it has waited ``overflow_after_s`` (a slot often frees sooner, and each
    overflow misses the target on every chunk until it is relieved); each decision moves one back to a free slot
    elsewhere as soon as one exists; ``billing``: how GPUs are billed, so scale-in keeps a surplus GPU while it is
    paid for anyway and releases it just before its next increment (None: as if billed to the instant)."""

    scale_kind: str
    target_ms: float = 400.0
    rebalance_interval_s: float = 10.0
    consolidate: bool = True
    landing_migrations: bool = False
    migration_cooldown_s: float = 0.0
    price_migrations: bool = False
    overflow_slots: int = 0
    overflow_after_s: float = 3.0
    billing: Billing | None = None

    def __post_init__(self) -> None:
        if self.target_ms <= 0 or self.overflow_slots < 0 or self.overflow_after_s < 0:
            raise ControllerConfigError(
                f"need target_ms > 0, overflow_slots >= 0 and overflow_after_s >= 0, got {self.target_ms}, "
                f"{self.overflow_slots}, {self.overflow_after_s}"
            )


@dataclass(frozen=True, slots=True)
class Models:
    """The fitted models a controller predicts with; the live system feeds them through ``observe_*``."""

    latency: LatencyModel
    migration: MigrationCostModel
    restore: RestoreCostModel


class ClosedLoopController:
    """Placement, rebalancing and autoscaling policies composed into one decision."""

    def __init__(
        self,
        name: str,
        placement: PlacementPolicy,
        rebalance: RebalancePolicy,
        autoscale: AutoscalePolicy,
        models: Models,
        config: ControllerConfig,
        detector: WorkloadDetector | None = None,
        budget: ViolationBudget | None = None,
    ) -> None:
        self.name = name
        self.placement = placement
        self.rebalance_policy = rebalance
        self.autoscale = autoscale
        self.models = models
        self.config = config
        self.detector = detector or WorkloadDetector()
        self.budget = budget or ViolationBudget()
        self._last_rebalance_s: float | None = None
        self._below_since_s: float | None = None
        self._recent_targets: collections.deque[tuple[float, int]] = collections.deque()
        self.capacity = models.latency.curve(config.scale_kind).capacity

    @property
    def initial_gpus(self) -> int:
        return self.autoscale.min_gpus

    def observe_chunk(self, kind: str, sessions: int, chunk_latency_ms: float) -> None:
        self.models.latency.observe(kind, sessions, chunk_latency_ms)

    def observe_migration(self, state_bytes: int, elapsed_ms: float, same_node: bool = False) -> None:
        self.models.migration.observe(state_bytes, elapsed_ms, same_node)

    def observe_restore(self, state_bytes: int, elapsed_ms: float) -> None:
        self.models.restore.observe(state_bytes, elapsed_ms)

    def learnt(self, now_s: float) -> dict[str, Any]:
        """The violation budget, the detector's windows and, where the sizing learns, its memory: plain data, times
        as ages at ``now_s``. The cost models (refitted from heartbeats) are left to relearn."""
        state: dict[str, Any] = {"version": LEARNT_VERSION, "budget": self.budget.learnt(now_s),
                                 "detector": self.detector.learnt(now_s)}
        if isinstance(self.autoscale, Learning):
            state["autoscale"] = self.autoscale.learnt(now_s)
        return state

    def relearn(self, state: object, at_s: float) -> None:
        """Take back what ``learnt`` gave, as of ``at_s`` on this clock: all of it, or none (LearntStateError)."""
        if not isinstance(state, Mapping) or state.get("version") != LEARNT_VERSION:
            version = state.get("version") if isinstance(state, Mapping) else type(state).__name__
            raise LearntStateError(f"learnt state of version {version!r}; this controller reads {LEARNT_VERSION}")
        try:
            budget = ViolationBudget.from_learnt(self.budget.params, state["budget"], at_s)
            detector = WorkloadDetector(self.detector.window_s, self.detector.recent_s, self.detector.levels)
            if "detector" in state:  # a state kept before the windows were
                detector.relearn(state["detector"], at_s)
            if isinstance(self.autoscale, Learning) and "autoscale" in state:
                self.autoscale.relearn(state["autoscale"], at_s)
        except (KeyError, TypeError, ValueError) as exc:
            raise LearntStateError(f"malformed learnt state: {exc!r}") from exc
        self.budget, self.detector = budget, detector

    def decide(self, snapshot: ClusterSnapshot, now_s: float) -> Plan:
        reading = self.detector.update(
            now_s,
            snapshot.active_count,
            snapshot.arrivals_total + snapshot.activations_total,
            snapshot.deactivations_total,
        )
        workspace = Workspace(snapshot, self.models.latency, now_s)
        actions: list[Action] = []
        for session_id in snapshot.idle_resident:
            gpu_id = snapshot.sessions[session_id].gpu_id
            assert gpu_id is not None
            workspace.discard(gpu_id, session_id)
            actions.append(Offload(session_id, gpu_id, "idle: free its slot, keep its state in host memory"))
        for gpu_id in snapshot.draining:
            actions.extend(self._progress_drain(workspace, gpu_id))
        placements, late_landings = self._place_waiting(workspace)
        actions.extend(placements)
        if self.config.overflow_slots:
            actions.extend(self._relieve_overflow(workspace))
        unplaced = len(snapshot.waiting) - sum(isinstance(a, (Place, Restore)) for a in placements)
        overflowing = sum(map(workspace.past_capacity, workspace.over_capacity(self.config.overflow_slots)))
        self.budget.record(now_s, snapshot.active_count, unplaced + overflowing, late_landings)
        reading = replace(reading, headroom_scale=self.budget.headroom_scale())
        if self._last_rebalance_s is None or now_s - self._last_rebalance_s >= self.config.rebalance_interval_s:
            self._last_rebalance_s = now_s
            actions.extend(
                self.rebalance_policy.rebalance(workspace, self.models.migration, reading.level.latency_weight)
            )
        target, scale_actions = self._scale(workspace, reading, now_s)
        actions.extend(scale_actions)
        return Plan(tuple(actions), reading.level.name, workspace.bottleneck_ms(), target)

    def _place_waiting(self, workspace: Workspace) -> tuple[list[Action], int]:
        """The placements, and how many of them are resumes whose first chunk the restore makes late."""
        actions: list[Action] = []
        late = 0
        sessions = workspace.snapshot.sessions
        for session_id in workspace.snapshot.waiting:
            session = sessions[session_id]
            restore = self._restore_delay(session) if session.offloaded else None
            choice = self.placement.choose(workspace, session, restore)
            if choice is None and self._may_overflow(session, workspace.now_s):
                overflow = workspace.first_overflow(self.config.overflow_slots, session.model)
                if overflow is not None:
                    choice = overflow, "overflow: every GPU is at capacity, so late for the target but not waiting"
            if choice is None:
                break
            gpu_id, reason = choice
            if restore is not None and self.config.landing_migrations:
                actions.extend(self._make_landing(workspace, gpu_id, restore))
            workspace.add(gpu_id, session_id)
            if restore is not None:
                late += workspace.landing_late_chunks(gpu_id, workspace.count(gpu_id), restore, self.config.target_ms)
                actions.append(Restore(session_id, gpu_id, f"resumed; {reason}"))
            else:
                actions.append(Place(session_id, gpu_id, f"new; {reason}"))
        return actions, late

    def _restore_delay(self, session: SessionView) -> RestoreDelay:
        return lambda chunk_ms: self.models.restore.delay_ms(session.state_bytes, chunk_ms)

    def _may_overflow(self, session: SessionView, now_s: float) -> bool:
        since_s = session.waiting_since_s
        return self.config.overflow_slots > 0 and (since_s is None or now_s - since_s >= self.config.overflow_after_s)

    def _transfer_ms(self, workspace: Workspace, session_id: str, source: str, target: str) -> float:
        state_bytes = workspace.snapshot.sessions[session_id].state_bytes
        return self.models.migration.cost_ms(state_bytes, workspace.same_node(source, target))

    def _late_chunks(self, workspace: Workspace, session_id: str, source: str, target: str) -> int:
        """What a move costs in chunks over target; 0 when migrations are not priced (the paper's rule)."""
        if not self.config.price_migrations:
            return 0
        transfer_ms = self._transfer_ms(workspace, session_id, source, target)
        return workspace.migration_late_chunks(source, target, transfer_ms, self.config.target_ms)

    def _quiet_target(self, workspace: Workspace, session_id: str, source: str, most_late: int) -> str | None:
        """A GPU with a free slot that a move of ``session_id`` from ``source`` holds up at most ``most_late``
        chunks past target on (fewest first, then lightest). A GPU within the source's node is found even where
        the level's first GPU is on another; each level is searched ``SEARCH_PER_LEVEL`` GPUs deep, so a
        decision stays fast at a thousand GPUs."""
        model = workspace.snapshot.sessions[session_id].model
        best: tuple[int, str] | None = None
        for kind, count in workspace.open_levels():
            searched = 0
            for gpu_id in workspace.level_gpus(kind, count):
                if gpu_id == source or not workspace.usable(gpu_id) or not workspace.serves(gpu_id, model):
                    continue
                if count >= workspace.snapshot.gpus[gpu_id].capacity:
                    continue
                late = self._late_chunks(workspace, session_id, source, gpu_id)
                if late == 0:
                    return gpu_id
                if late <= most_late and (best is None or late < best[0]):
                    best = (late, gpu_id)
                searched += 1
                if searched >= SEARCH_PER_LEVEL:
                    break
        return None if best is None else best[1]

    def _relieve_overflow(self, workspace: Workspace) -> list[Migrate]:
        """One session off each GPU past its capacity, to a free slot elsewhere: an overflowing GPU misses the
        target on the chunks of its sessions past capacity (those in its second forward) until one leaves, so a
        move is worth it when it holds up fewer chunks than ``RELIEF_INTERVALS`` intervals of those."""
        sessions = workspace.snapshot.sessions
        moves: list[Migrate] = []
        for source in workspace.over_capacity(self.config.overflow_slots):
            resident = workspace.snapshot.residents[source]
            movable = [s for s in workspace.members(source) if s in resident and self._may_move(sessions[s], workspace)]
            if not movable:
                continue
            mover = min(movable, key=lambda s: sessions[s].state_bytes)
            most_late = RELIEF_INTERVALS * workspace.past_capacity(source)
            target = self._quiet_target(workspace, mover, source, most_late)
            if target is None:
                continue
            late = self._late_chunks(workspace, mover, source, target)
            workspace.discard(source, mover)
            workspace.add(target, mover)
            moves.append(Migrate(mover, source, target, 0.0, f"overflow relief: its GPU back within capacity; "
                                 f"{late} chunks held up past target"))
        return moves

    def _make_landing(self, workspace: Workspace, gpu_id: str, restore: RestoreDelay) -> list[Migrate]:
        """One migration that lets a restore onto ``gpu_id`` meet the target, if one exists that itself does."""
        count = workspace.count(gpu_id)
        if not workspace.landing_late_chunks(gpu_id, count + 1, restore, self.config.target_ms):
            return []
        if workspace.landing_late_chunks(gpu_id, count, restore, self.config.target_ms):
            return []
        sessions = workspace.snapshot.sessions
        resident = workspace.snapshot.residents[gpu_id]
        members = [s for s in workspace.members(gpu_id) if s in resident and self._may_move(sessions[s], workspace)]
        if not members:
            return []
        mover = min(members, key=lambda s: sessions[s].state_bytes)
        for target_kind, target_count in workspace.open_levels():
            target = workspace.first_usable(target_kind, target_count, excluding=gpu_id,
                                            model=sessions[mover].model)
            if target is None:
                continue
            after_ms = workspace.latency_ms(target_kind, target_count + 1)
            pause_ms = self._transfer_ms(workspace, mover, gpu_id, target)
            if (after_ms + pause_ms <= self.config.target_ms and target_count > 0
                    and self._late_chunks(workspace, mover, gpu_id, target) == 0):
                workspace.discard(gpu_id, mover)
                workspace.add(target, mover)
                return [Migrate(mover, gpu_id, target, 0.0,
                                f"make room for a resume: its GPU then meets {self.config.target_ms:.0f} ms "
                                f"with the restore; this move pauses {pause_ms:.0f} ms, {after_ms:.0f} ms there")]
        return []

    def _may_move(self, session: SessionView, workspace: Workspace) -> bool:
        moved_at = session.last_migrated_at_s
        return moved_at is None or workspace.now_s - moved_at >= self.config.migration_cooldown_s

    def _evacuate(self, workspace: Workspace, gpu_id: str, why: str) -> list[Migrate] | None:
        """Move every session off ``gpu_id`` (already excluded from placement); None, undone, if any cannot go,
        or (priced) cannot go without holding up a chunk past the target."""
        sessions = workspace.snapshot.sessions
        moves: list[Migrate] = []
        for session_id in list(workspace.members(gpu_id)):
            choice = self.placement.choose(workspace, sessions[session_id], None)
            if choice is not None and self._late_chunks(workspace, session_id, gpu_id, choice[0]) > 0:
                choice = None
            if choice is None:
                for move in moves:
                    workspace.discard(move.target_gpu_id, move.session_id)
                    workspace.add(gpu_id, move.session_id)
                return None
            workspace.discard(gpu_id, session_id)
            workspace.add(choice[0], session_id)
            moves.append(Migrate(session_id, gpu_id, choice[0], 0.0, f"{why}; {choice[1]}"))
        return moves

    def _progress_drain(self, workspace: Workspace, gpu_id: str) -> list[Action]:
        if workspace.count(gpu_id) == 0:
            workspace.mark_removed(gpu_id)
            return [RemoveGpu(gpu_id, "drained: no session left")]
        if not self.config.consolidate:
            return []
        return list(self._evacuate(workspace, gpu_id, "draining GPU") or [])

    def _scale(self, workspace: Workspace, reading: WorkloadReading, now_s: float) -> tuple[int, list[Action]]:
        snapshot = workspace.snapshot
        pool = len(snapshot.gpus) - len(snapshot.draining) - len(workspace.removed - set(snapshot.draining))
        capacity = snapshot.typical_capacity(self.config.scale_kind) or self.capacity
        target, reason = self.autoscale.target_gpus(reading, capacity)
        if target >= pool:
            self._below_since_s = None
            self._recent_targets.clear()
            if target == pool:
                return target, []
            return target, [AddGpus(self.config.scale_kind, target - pool, f"scale out: {reason}")]
        hold_s = self.autoscale.hold_s if self.autoscale.hold_s is not None else reading.level.scale_in_hold_s
        self._recent_targets.append((now_s, target))
        while self._recent_targets[0][0] < now_s - hold_s:
            self._recent_targets.popleft()
        if self._below_since_s is None:
            self._below_since_s = now_s
        held = max(count for _, count in self._recent_targets)
        if now_s - self._below_since_s < hold_s or held >= pool:
            return target, []
        return target, self._scale_in(workspace, pool - held, reason, now_s)

    def _release_order(self, workspace: Workspace, now_s: float) -> Iterator[str]:
        """GPUs cheapest to release first: still provisioning (the furthest from ready first, so a flap of
        demand does not cancel the GPU about to serve and restart its delay), then by resident count, fewest
        bytes within a count. Walks the level index lightest first, so it stops early instead of sorting every
        GPU. A GPU paid for beyond the next ``RELEASE_LEAD_S`` is left out: releasing it would save nothing."""
        snapshot = workspace.snapshot
        skip = set(snapshot.draining) | workspace.removed
        billing = self.config.billing
        if billing is not None:
            skip |= {g for g, gpu in snapshot.gpus.items() if gpu.billed_since_s is not None
                     and billing.paid_until_s(gpu.billed_since_s, now_s) > now_s + RELEASE_LEAD_S}
        provisioning = [g for g, gpu in snapshot.gpus.items() if gpu.ready_at_s > now_s and g not in skip]
        yield from sorted(provisioning, key=lambda g: (-snapshot.gpus[g].ready_at_s, g))
        for kind in self.models.latency.kinds:
            for count in range(self.models.latency.curve(kind).capacity + 1):
                level = [g for g in workspace.level_gpus(kind, count) if g not in skip and workspace.usable(g)]
                if count > 0:
                    level.sort(key=lambda g: sum(snapshot.sessions[s].state_bytes for s in workspace.members(g)))
                yield from level

    def _scale_in(self, workspace: Workspace, excess: int, reason: str, now_s: float) -> list[Action]:
        """Release ``excess`` GPUs, cheapest first (see ``_release_order``). Gives up after
        ``EVACUATION_TRIES`` GPUs that cannot be emptied: the next ones hold more, and priced moves are often all
        refused. Every decision past the hold tries again, since a departure can make the lightest GPUs emptiable
        at any moment (and a free slot is soon taken by an arrival). Four tries each time saved nearly all that
        sixty-four each time did (1.19x against 1.18x the lower bound on RAGPulse 256), in a simulation 2.8 times
        faster."""
        actions: list[Action] = []
        failed = 0
        for gpu_id in self._release_order(workspace, now_s):
            if excess == 0:
                break
            if gpu_id in workspace.removed:
                continue
            if workspace.count(gpu_id) == 0:
                workspace.mark_removed(gpu_id)
                actions.append(RemoveGpu(gpu_id, f"scale in (empty GPU): {reason}"))
                excess -= 1
                continue
            if not self.config.consolidate:
                break
            workspace.draining.add(gpu_id)
            moves = self._evacuate(workspace, gpu_id, "scale in: consolidate")
            if moves is None:
                workspace.draining.discard(gpu_id)
                failed += 1
                if failed >= EVACUATION_TRIES:
                    break
                continue
            actions.append(DrainGpu(gpu_id, f"scale in: {reason}"))
            actions.extend(moves)
            excess -= 1
        return actions
