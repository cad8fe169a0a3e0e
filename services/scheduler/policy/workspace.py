"""A decision's scratch copy of the cluster: tentative moves layered over the snapshot, copy-on-write.

Only the GPU levels a move touches are copied, so a decision costs O(moves x GPU kinds x capacity), not
O(GPUs): this is what keeps a decision fast at a thousand GPUs, where the paper's rule rescans every GPU
for every candidate move.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from services.scheduler.policy.cost_models import LatencyModel
from services.scheduler.policy.snapshot import ClusterSnapshot

RestoreDelay = Callable[[float], float]  # a forward's ms -> the ms a restore streamed in under it adds to it


class Workspace:
    """Resident counts and members per GPU after the moves made so far in this decision."""

    def __init__(self, snapshot: ClusterSnapshot, latency: LatencyModel, now_s: float) -> None:
        self.snapshot = snapshot
        self.latency = latency
        self.now_s = now_s
        self._levels = dict(snapshot.levels)
        self._owned_levels: set[tuple[str, int]] = set()
        self._members: dict[str, dict[str, None]] = {}
        self.draining: set[str] = set(snapshot.draining)
        self.removed: set[str] = set()

    def count(self, gpu_id: str) -> int:
        members = self._members.get(gpu_id)
        return len(members) if members is not None else len(self.snapshot.residents[gpu_id])

    def members(self, gpu_id: str) -> dict[str, None]:
        members = self._members.get(gpu_id)
        return members if members is not None else self.snapshot.residents[gpu_id]

    def _own_members(self, gpu_id: str) -> dict[str, None]:
        members = self._members.get(gpu_id)
        if members is None:
            members = dict(self.snapshot.residents[gpu_id])
            self._members[gpu_id] = members
        return members

    def _own_level(self, key: tuple[str, int]) -> dict[str, None]:
        if key not in self._owned_levels:
            self._levels[key] = dict(self._levels.get(key, {}))
            self._owned_levels.add(key)
        return self._levels[key]

    def _shift(self, gpu_id: str, before: int, after: int) -> None:
        kind = self.snapshot.gpus[gpu_id].kind
        del self._own_level((kind, before))[gpu_id]
        self._own_level((kind, after))[gpu_id] = None

    def add(self, gpu_id: str, session_id: str) -> None:
        members = self._own_members(gpu_id)
        members[session_id] = None
        self._shift(gpu_id, len(members) - 1, len(members))

    def discard(self, gpu_id: str, session_id: str) -> None:
        members = self._own_members(gpu_id)
        del members[session_id]
        self._shift(gpu_id, len(members) + 1, len(members))

    def mark_removed(self, gpu_id: str) -> None:
        kind = self.snapshot.gpus[gpu_id].kind
        del self._own_level((kind, self.count(gpu_id)))[gpu_id]
        self.removed.add(gpu_id)

    def usable(self, gpu_id: str) -> bool:
        gpu = self.snapshot.gpus[gpu_id]
        return gpu.ready_at_s <= self.now_s and gpu_id not in self.draining and gpu_id not in self.removed

    def occupied_levels(self) -> Iterator[tuple[str, int, int]]:
        """(kind, resident count, number of GPUs) for every level with at least one session per GPU."""
        for (kind, count), gpus in self._levels.items():
            if count > 0 and gpus:
                yield kind, count, len(gpus)

    def level_gpus(self, kind: str, count: int) -> dict[str, None]:
        return self._levels.get((kind, count), {})

    def serves(self, gpu_id: str, model: str) -> bool:
        """Whether the GPU runs ``model``; an empty model on either side (the simulator's) matches any."""
        gpu_model = self.snapshot.gpus[gpu_id].model
        return not model or not gpu_model or gpu_model == model

    def first_usable(self, kind: str, count: int, excluding: str | None = None, model: str = "") -> str | None:
        """The first GPU (in a deterministic order) of this level that can take a session of ``model`` now."""
        for gpu_id in self._levels.get((kind, count), ()):
            if (gpu_id != excluding and self.usable(gpu_id) and count < self.snapshot.gpus[gpu_id].capacity
                    and self.serves(gpu_id, model)):
                return gpu_id
        return None

    def first_overflow(self, most: int, model: str = "") -> str | None:
        """A usable GPU at its latency capacity or past it by fewer than ``most``, with an overflow slot free;
        the least past capacity first. Every overflow costs its own chunks wherever it lands (a GPU keeps l(K) for
        its first K sessions, ``LatencyCurve``), but the sessions past K share the second forward, so spreading
        them keeps that forward short, and each overflowing GPU can be relieved in the same decision. Where no
        GPU has an overflow slot at all it returns at once rather than walk every full GPU."""
        if not self.snapshot.overflow_slots_total:
            return None
        for kind in self.latency.kinds:
            capacity = self.latency.curve(kind).capacity
            for count in range(capacity, capacity + most):
                for gpu_id in self._levels.get((kind, count), ()):
                    gpu = self.snapshot.gpus[gpu_id]
                    if count < gpu.slots and self.usable(gpu_id) and self.serves(gpu_id, model):
                        return gpu_id
        return None

    def over_capacity(self, most: int) -> Iterator[str]:
        """GPUs past their latency capacity by 1 to ``most`` sessions (in overflow slots)."""
        for kind in self.latency.kinds:
            capacity = self.latency.curve(kind).capacity
            for count in range(capacity + 1, capacity + 1 + most):
                yield from list(self._levels.get((kind, count), ()))

    def past_capacity(self, gpu_id: str) -> int:
        """Sessions of ``gpu_id`` in overflow slots: those its second forward runs, late for the target."""
        return self.count(gpu_id) - self.snapshot.gpus[gpu_id].capacity

    def same_node(self, first: str, second: str) -> bool:
        node = self.snapshot.gpus[first].node
        return bool(node) and node == self.snapshot.gpus[second].node

    def migration_late_chunks(self, source: str, target: str, transfer_ms: float, target_ms: float) -> int:
        """Chunks a move from ``source`` to ``target`` would push over ``target_ms``: it runs at a chunk boundary
        and holds up the next batch of both GPUs for ``transfer_ms``; the moving session's next chunk is in the
        target's batch, so its pause is counted there."""
        staying = self.late_chunks(source, self.count(source) - 1, transfer_ms, target_ms)
        return staying + self.late_chunks(target, self.count(target) + 1, transfer_ms, target_ms)

    def late_chunks(self, gpu_id: str, count: int, extra_ms: float, target_ms: float) -> int:
        """Chunks over ``target_ms`` in the next interval of ``gpu_id`` holding ``count`` sessions, its forwards
        held up ``extra_ms``."""
        return self.latency.curve(self.snapshot.gpus[gpu_id].kind).late_chunks(count, extra_ms, target_ms)

    def landing_late_chunks(self, gpu_id: str, count: int, restore: RestoreDelay | None, target_ms: float) -> int:
        """Chunks past ``target_ms`` in the next interval of ``gpu_id`` holding ``count`` sessions, one of them just
        landed. A resumed one streams its restore in under the first forward (it has no deadline yet, so it is in
        the first): that forward and any after it start late by what the copy does not hide."""
        curve = self.latency.curve(self.snapshot.gpus[gpu_id].kind)
        extra_ms = 0.0 if restore is None else restore(curve.batches(count)[0][0])
        return curve.late_chunks(count, extra_ms, target_ms)

    def latency_ms(self, kind: str, count: int) -> float:
        return self.latency.curve(kind).chunk_latency_ms(count)

    def bottleneck_ms(self, without: tuple[str, int] | None = None) -> float:
        """Max predicted chunk latency over GPUs; ``without`` discounts one GPU of that level."""
        worst = 0.0
        for kind, count, gpus in self.occupied_levels():
            if without == (kind, count) and gpus == 1:
                continue
            worst = max(worst, self.latency_ms(kind, count))
        return worst

    def hottest(self) -> tuple[str, int, int] | None:
        """(kind, count, how many GPUs share that latency) of the worst level, or None when all are empty."""
        best: tuple[str, int, int] | None = None
        best_ms = -1.0
        ties = 0
        for kind, count, gpus in self.occupied_levels():
            value = self.latency_ms(kind, count)
            if value > best_ms:
                best, best_ms, ties = (kind, count, gpus), value, gpus
            elif value == best_ms:
                ties += gpus
        if best is None:
            return None
        return best[0], best[1], ties

    def open_levels(self) -> Iterator[tuple[str, int]]:
        """(kind, count) of every level that may hold a GPU with a free slot, lightest first per kind."""
        for kind in self.latency.kinds:
            for count in range(self.latency.curve(kind).capacity):
                if self._levels.get((kind, count)):
                    yield kind, count
