"""Placement family: which GPU an active session without one goes to. Sessions already placed stay put.

Every policy answers ``choose(workspace, session, restore) -> (gpu_id, reason) | None``; None means no GPU can
take it now (it waits, and its waiting counts in its chunk latency). ``restore`` is None for a session that needs
no restore, else how late its first chunk comes given the chunk time where it lands.
"""

from __future__ import annotations

from typing import Protocol

from services.scheduler.policy.snapshot import SessionView
from services.scheduler.policy.workspace import RestoreDelay, Workspace

Choice = tuple[str, str] | None


class PlacementPolicy(Protocol):
    name: str

    def choose(self, workspace: Workspace, session: SessionView, restore: RestoreDelay | None) -> Choice: ...


class MinBottleneckPlacement:
    """The paper's rule: the feasible GPU giving the smallest resulting bottleneck, ties to the lighter GPU.

    With ``restore_aware`` (ours) the bottleneck counts only above the latency target (max(L, target)): any
    latency that meets the target is as good as any other, so ties are common and broken by what matters
    next: a resuming session goes where its first chunk (restore time included) still meets the target,
    lightest first; a new session goes to the fullest tied GPU (best fit), which keeps light GPUs free for
    resumes and leaves GPUs empty for cheap scale-in.
    """

    def __init__(self, restore_aware: bool, target_ms: float) -> None:
        self.name = "min_bottleneck_restore_aware" if restore_aware else "min_bottleneck"
        self.restore_aware = restore_aware
        self.target_ms = target_ms

    def choose(self, workspace: Workspace, session: SessionView, restore: RestoreDelay | None) -> Choice:
        current_ms = workspace.bottleneck_ms()
        best: tuple[tuple[float, ...], str, float] | None = None
        for kind, count in workspace.open_levels():
            gpu_id = workspace.first_usable(kind, count, model=session.model)
            if gpu_id is None:
                continue
            after_ms = workspace.latency_ms(kind, count + 1)
            resulting_ms = max(current_ms, after_ms)
            if self.restore_aware:
                resulting_ms = max(resulting_ms, self.target_ms)
                misses_target = float(workspace.landing_late_chunks(gpu_id, count + 1, restore, self.target_ms) > 0)
                fill = -after_ms if restore is None else after_ms
                score: tuple[float, ...] = (resulting_ms, misses_target, fill)
            else:
                score = (resulting_ms, after_ms)
            if best is None or score < best[0]:
                best = (score, gpu_id, after_ms)
        if best is None:
            return None
        _, gpu_id, after_ms = best
        return gpu_id, f"min bottleneck {best[0][0]:.0f} ms; this GPU then {after_ms:.0f} ms per chunk"


class LeastLoadedPlacement:
    """Greedy: the usable GPU with the smallest fraction of its slots taken."""

    name = "least_loaded"

    def choose(self, workspace: Workspace, session: SessionView, restore: RestoreDelay | None) -> Choice:
        best: tuple[float, str] | None = None
        for kind, count in workspace.open_levels():
            gpu_id = workspace.first_usable(kind, count, model=session.model)
            if gpu_id is None:
                continue
            load = count / workspace.snapshot.gpus[gpu_id].capacity
            if best is None or load < best[0]:
                best = (load, gpu_id)
        if best is None:
            return None
        return best[1], f"least loaded ({best[0]:.0%} of slots taken)"


class ByMemoryPlacement:
    """Greedy: the usable GPU with the most free state memory (capacity slots of the largest state, minus the
    bytes resident). Scans every GPU, as that baseline does."""

    name = "by_memory"

    def choose(self, workspace: Workspace, session: SessionView, restore: RestoreDelay | None) -> Choice:
        best: tuple[int, str] | None = None
        snapshot = workspace.snapshot
        for gpu_id, gpu in snapshot.gpus.items():
            if (not workspace.usable(gpu_id) or workspace.count(gpu_id) >= gpu.capacity
                    or not workspace.serves(gpu_id, session.model)):
                continue
            used = sum(snapshot.sessions[s].state_bytes for s in workspace.members(gpu_id) if s in snapshot.sessions)
            free = gpu.capacity * session.state_bytes - used
            if best is None or free > best[0]:
                best = (free, gpu_id)
        if best is None:
            return None
        return best[1], f"most free memory ({best[0] / 1e9:.1f} GB)"


class RoundRobinPlacement:
    """Cycles through GPUs in id order, skipping full or unusable ones. Holds its cursor between decisions."""

    name = "round_robin"

    def __init__(self) -> None:
        self._last_gpu_id = ""

    def choose(self, workspace: Workspace, session: SessionView, restore: RestoreDelay | None) -> Choice:
        candidates = sorted(
            gpu_id
            for gpu_id, gpu in workspace.snapshot.gpus.items()
            if workspace.usable(gpu_id) and workspace.count(gpu_id) < gpu.capacity
            and workspace.serves(gpu_id, session.model)
        )
        if not candidates:
            return None
        after = [gpu_id for gpu_id in candidates if gpu_id > self._last_gpu_id]
        chosen = after[0] if after else candidates[0]
        self._last_gpu_id = chosen
        return chosen, "round robin"
