"""The paper's rule exactly as described, rescanning everything: a reference for decision-time comparisons.

Placement tries every feasible GPU and recomputes the bottleneck over all GPUs for each; rebalancing tries
every (session on the hottest GPU, other GPU) pair and recomputes the bottleneck for each. That is
O(GPUs^2) per placement and O(K GPUs^2) per migration, which is what our indexed controller avoids.
"""

from __future__ import annotations

import math

from services.scheduler.policy.actions import Action, AddGpus, Migrate, Offload, Place, Plan, Restore
from services.scheduler.policy.cost_models import LatencyModel, TransferCostModel
from services.scheduler.policy.snapshot import ClusterSnapshot


class NaivePaperScheduler:
    """Min-bottleneck placement, min-max rebalancing (eta, min gain) and ceil(N / (K rho)) scale-out."""

    def __init__(
        self, latency: LatencyModel, migration: TransferCostModel, scale_kind: str, rho: float = 0.9,
        eta: float = 1.0, min_gain_ms: float = 5.0,
    ) -> None:
        self.latency, self.migration = latency, migration
        self.scale_kind, self.rho, self.eta, self.min_gain_ms = scale_kind, rho, eta, min_gain_ms

    def _bottleneck(self, counts: dict[str, int], kinds: dict[str, str]) -> float:
        return max((self.latency.curve(kinds[g]).chunk_latency_ms(n) for g, n in counts.items()), default=0.0)

    def decide(self, snapshot: ClusterSnapshot, now_s: float) -> Plan:
        counts = {g: len(members) for g, members in snapshot.residents.items()}
        members = {g: list(m) for g, m in snapshot.residents.items()}
        kinds = {g: gpu.kind for g, gpu in snapshot.gpus.items()}
        usable = {g for g, gpu in snapshot.gpus.items() if gpu.ready_at_s <= now_s and not gpu.draining}
        actions: list[Action] = []
        for session_id in snapshot.idle_resident:
            gpu_id = snapshot.sessions[session_id].gpu_id
            assert gpu_id is not None
            counts[gpu_id] -= 1
            members[gpu_id].remove(session_id)
            actions.append(Offload(session_id, gpu_id, "idle"))
        for session_id in snapshot.waiting:
            best: tuple[float, float, str] | None = None
            for gpu_id in usable:
                if counts[gpu_id] >= snapshot.gpus[gpu_id].capacity:
                    continue
                counts[gpu_id] += 1
                own_ms = self.latency.curve(kinds[gpu_id]).chunk_latency_ms(counts[gpu_id])
                score = (self._bottleneck(counts, kinds), own_ms, gpu_id)
                counts[gpu_id] -= 1
                if best is None or score < best:
                    best = score
            if best is None:
                break
            counts[best[2]] += 1
            members[best[2]].append(session_id)
            kind = Restore if snapshot.sessions[session_id].offloaded else Place
            actions.append(kind(session_id, best[2], f"min bottleneck {best[0]:.0f} ms"))
        actions.extend(self._rebalance(snapshot, counts, members, kinds, usable))
        pool = len(snapshot.gpus) - len(snapshot.draining)
        capacity = self.latency.curve(self.scale_kind).capacity
        active = snapshot.active_count
        target = max(math.ceil(active / (capacity * self.rho)), math.ceil(active / capacity))
        if target > pool:
            actions.append(AddGpus(self.scale_kind, target - pool, f"ceil(N / (K rho)) = {target}"))
        return Plan(tuple(actions), "naive", self._bottleneck(counts, kinds), target)

    def _rebalance(
        self, snapshot: ClusterSnapshot, counts: dict[str, int], members: dict[str, list[str]],
        kinds: dict[str, str], usable: set[str],
    ) -> list[Migrate]:
        moves: list[Migrate] = []
        while True:
            current = self._bottleneck(counts, kinds)
            hottest = max(counts, key=lambda g: self.latency.curve(kinds[g]).chunk_latency_ms(counts[g]), default=None)
            if hottest is None:
                return moves
            best: tuple[float, str, str] | None = None
            for session_id in members[hottest]:
                kappa = self.migration.cost_ms(snapshot.sessions[session_id].state_bytes)
                for target in usable:
                    if target == hottest or counts[target] >= snapshot.gpus[target].capacity:
                        continue
                    counts[hottest] -= 1
                    counts[target] += 1
                    gain = current - self._bottleneck(counts, kinds) - self.eta * kappa
                    counts[hottest] += 1
                    counts[target] -= 1
                    if best is None or gain > best[0]:
                        best = (gain, session_id, target)
            if best is None or best[0] < self.min_gain_ms:
                return moves
            gain, session_id, target = best
            counts[hottest] -= 1
            counts[target] += 1
            members[hottest].remove(session_id)
            members[target].append(session_id)
            moves.append(Migrate(session_id, hottest, target, gain, "min-max (full rescan)"))
