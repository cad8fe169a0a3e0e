"""Rebalance family: migration-aware min-max moves off the hottest GPU, and the no-migration baseline.

gain = L - L' - eta * kappa, kappa = the fitted migration cost of the session's bytes over the link between the
two GPUs (within a node or across nodes). A move is applied while
the best gain is at least the threshold, at most ``max_moves`` per round. Since a GPU's latency depends only
on how many sessions it holds, every session on the hottest GPU yields the same L'; the cheapest one to move
(fewest bytes, not moved within ``cooldown_s``) is the best candidate, so no session list is scanned twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from services.scheduler.policy.actions import Migrate
from services.scheduler.policy.cost_models import MigrationCostModel
from services.scheduler.policy.workspace import Workspace


class RebalancePolicy(Protocol):
    name: str

    def rebalance(
        self, workspace: Workspace, migration: MigrationCostModel, latency_weight: float
    ) -> list[Migrate]: ...


class NoRebalance:
    """Never migrates to rebalance (the "without migration" ablation and the greedy baselines)."""

    name = "none"

    def rebalance(
        self, workspace: Workspace, migration: MigrationCostModel, latency_weight: float
    ) -> list[Migrate]:
        return []


@dataclass(frozen=True, slots=True)
class _Move:
    gain_ms: float
    session_id: str
    source: str
    target: str
    after_ms: float


class MinMaxRebalance:
    """The paper's min-max rule; ``cooldown_s`` > 0 (ours) never moves a session twice within that window.

    ``floor_ms`` > 0 (ours: the latency target) counts a bottleneck only above it, max(L, floor): a move that
    lowers latencies already within target buys nothing and costs a pause. The threshold is
    ``min_gain_ms / latency_weight``: a level that weighs latency more accepts smaller gains.
    """

    def __init__(self, eta: float, min_gain_ms: float, max_moves: int, cooldown_s: float, floor_ms: float) -> None:
        self.name = "min_max_cooldown" if cooldown_s > 0 else "min_max"
        self.eta = eta
        self.min_gain_ms = min_gain_ms
        self.max_moves = max_moves
        self.cooldown_s = cooldown_s
        self.floor_ms = floor_ms

    def rebalance(
        self, workspace: Workspace, migration: MigrationCostModel, latency_weight: float
    ) -> list[Migrate]:
        threshold_ms = self.min_gain_ms / max(latency_weight, 1e-9)
        moves: list[Migrate] = []
        moved: set[str] = set()
        while len(moves) < self.max_moves:
            move = self._best_move(workspace, migration, moved)
            if move is None or move.gain_ms < threshold_ms:
                break
            workspace.discard(move.source, move.session_id)
            workspace.add(move.target, move.session_id)
            moved.add(move.session_id)
            moves.append(
                Migrate(
                    move.session_id,
                    move.source,
                    move.target,
                    move.gain_ms,
                    f"min-max: bottleneck down by {move.gain_ms:.1f} ms net of migration cost; "
                    f"target then {move.after_ms:.0f} ms per chunk",
                )
            )
        return moves

    def _best_move(self, workspace: Workspace, migration: MigrationCostModel, moved: set[str]) -> _Move | None:
        hottest = workspace.hottest()
        if hottest is None:
            return None
        kind, count, ties = hottest
        current_ms = workspace.latency_ms(kind, count)
        if ties > 1 or current_ms <= self.floor_ms:
            return None
        source = next(iter(workspace.level_gpus(kind, count)))
        session_id, _ = self._cheapest_session(workspace, source, migration.cost_ms, moved)
        if session_id is None:
            return None
        state_bytes = workspace.snapshot.sessions[session_id].state_bytes
        rest_ms = max(
            workspace.bottleneck_ms(without=(kind, count)), workspace.latency_ms(kind, count - 1), self.floor_ms
        )
        best: _Move | None = None
        model = workspace.snapshot.sessions[session_id].model
        for target_kind, target_count in workspace.open_levels():
            target = workspace.first_usable(target_kind, target_count, excluding=source, model=model)
            if target is None:
                continue
            after_ms = workspace.latency_ms(target_kind, target_count + 1)
            kappa_ms = migration.cost_ms(state_bytes, workspace.same_node(source, target))
            gain_ms = current_ms - max(rest_ms, after_ms) - self.eta * kappa_ms
            if best is None or gain_ms > best.gain_ms:
                best = _Move(gain_ms, session_id, source, target, after_ms)
        return best

    def _cheapest_session(
        self, workspace: Workspace, gpu_id: str, cost_ms: Callable[[int], float], moved: set[str]
    ) -> tuple[str | None, float]:
        sessions = workspace.snapshot.sessions
        best: tuple[float, str] | None = None
        for session_id in workspace.members(gpu_id):
            session = sessions.get(session_id)
            if session is None or session_id in moved:
                continue
            moved_at = session.last_migrated_at_s
            if self.cooldown_s > 0 and moved_at is not None and workspace.now_s - moved_at < self.cooldown_s:
                continue
            kappa = cost_ms(session.state_bytes)
            if best is None or kappa < best[0]:
                best = (kappa, session_id)
        if best is None:
            return None, 0.0
        return best[1], best[0]
