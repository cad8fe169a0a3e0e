"""Measured cost models: per-chunk latency l(n) per GPU kind, and migration / restore time per byte.

Each is a small least-squares fit pulled toward a prior (the reference defaults), so a handful of noisy samples
nudges it and thousands of samples dominate it. Fits keep only running sums: ``observe`` is O(1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

REFERENCE_BASE_MS = 180.0
REFERENCE_PER_SESSION_MS = 55.0
REFERENCE_QUADRATIC_MS = 18.0
REFERENCE_CAPACITY = 4


class CostModelError(ValueError):
    """A sample or parameter that no model can use (negative latency, zero sessions, unknown kind)."""


class _RidgeFit:
    """Least squares on features with a Gaussian prior ``prior_weight`` samples strong around ``prior``."""

    def __init__(self, prior: tuple[float, ...], prior_weight: float) -> None:
        size = len(prior)
        self._prior = np.asarray(prior, dtype=float)
        self._gram = np.eye(size) * prior_weight
        self._moment = self._prior * prior_weight
        self.coefficients: tuple[float, ...] = tuple(prior)
        self.samples = 0

    def observe(self, features: tuple[float, ...], value: float) -> None:
        row = np.asarray(features, dtype=float)
        self._gram += np.outer(row, row)
        self._moment += row * value
        self.samples += 1
        self.coefficients = tuple(float(c) for c in np.linalg.solve(self._gram, self._moment))


@dataclass(frozen=True, slots=True)
class LatencyCurve:
    """l(n) = base + per_session * (n - 1) + quadratic * (n / capacity)^2, in ms for one forward of n sessions.

    A GPU runs at most ``capacity`` sessions a forward (the worker's ``TURBOSERVE_MAX_BATCH`` defaults to its K),
    earliest deadline first, so a GPU holding more (overflow slots) runs its chunk interval as forwards back to
    back: the first ``capacity`` sessions' chunks keep l(K), and only the rest, waiting for it, come later.
    """

    base_ms: float = REFERENCE_BASE_MS
    per_session_ms: float = REFERENCE_PER_SESSION_MS
    quadratic_ms: float = REFERENCE_QUADRATIC_MS
    capacity: int = REFERENCE_CAPACITY
    batches_table: tuple[tuple[tuple[float, int], ...], ...] = field(init=False, repr=False, compare=False)
    table_ms: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise CostModelError(f"capacity must be at least 1, got {self.capacity}")
        table = tuple(self._batches(n) for n in range(2 * self.capacity + 2))
        object.__setattr__(self, "batches_table", table)
        object.__setattr__(self, "table_ms", tuple(batches[-1][0] if batches else 0.0 for batches in table))

    def _formula(self, sessions: int) -> float:
        return (
            self.base_ms
            + self.per_session_ms * (sessions - 1)
            + self.quadratic_ms * (sessions / self.capacity) ** 2
        )

    def _batches(self, sessions: int) -> tuple[tuple[float, int], ...]:
        batches: list[tuple[float, int]] = []
        done_ms = 0.0
        while sessions > 0:
            size = min(sessions, self.capacity)
            done_ms += self._formula(size)
            batches.append((done_ms, size))
            sessions -= size
        return tuple(batches)

    def batches(self, sessions: int) -> tuple[tuple[float, int], ...]:
        """(chunk latency, sessions) of each forward of one chunk interval on a GPU holding ``sessions``."""
        if sessions < len(self.batches_table):
            return self.batches_table[sessions]
        return self._batches(sessions)

    def chunk_latency_ms(self, sessions: int) -> float:
        """Predicted latency of the latest chunk on a GPU holding ``sessions`` (0 for an empty GPU)."""
        if sessions < len(self.table_ms):
            return self.table_ms[sessions]
        return self._batches(sessions)[-1][0]

    def late_chunks(self, sessions: int, extra_ms: float, target_ms: float) -> int:
        """Chunks of one interval over ``target_ms`` on a GPU holding ``sessions`` when its forwards start
        ``extra_ms`` late (a migration's transfer, a restore's copy)."""
        return sum(size for latency_ms, size in self.batches(sessions) if latency_ms + extra_ms > target_ms)


class LatencyModel:
    """One fitted ``LatencyCurve`` per GPU kind (kind names may include the model size, e.g. ``h100/1.3b``)."""

    def __init__(self, curves: dict[str, LatencyCurve], prior_weight: float = 20.0) -> None:
        if not curves:
            raise CostModelError("a latency model needs at least one GPU kind")
        self._curves = dict(curves)
        self._fits = {
            kind: _RidgeFit((c.base_ms, c.per_session_ms, c.quadratic_ms), prior_weight)
            for kind, c in curves.items()
        }

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self._curves)

    def curve(self, kind: str) -> LatencyCurve:
        curve = self._curves.get(kind)
        if curve is None:
            raise CostModelError(f"unknown GPU kind {kind!r}; known: {sorted(self._curves)}")
        return curve

    def observe(self, kind: str, sessions: int, chunk_latency_ms: float) -> None:
        """Feed one measured batched chunk: ``sessions`` shared the batch and it took ``chunk_latency_ms``."""
        curve = self.curve(kind)
        if sessions < 1 or chunk_latency_ms < 0:
            raise CostModelError(f"bad latency sample: sessions={sessions}, chunk_latency_ms={chunk_latency_ms}")
        fit = self._fits[kind]
        fit.observe((1.0, sessions - 1.0, (sessions / curve.capacity) ** 2), chunk_latency_ms)
        base, per_session, quadratic = fit.coefficients
        self._curves[kind] = LatencyCurve(base, per_session, quadratic, curve.capacity)


class TransferCostModel:
    """Time to move a session's state: ``alpha_ms + bytes / bytes_per_ms`` fitted from measured transfers.

    Used for each migration link and for the host-to-GPU copy of a restore (``RestoreCostModel``).
    """

    def __init__(self, alpha_ms: float, gigabytes_per_s: float, prior_weight: float = 5.0) -> None:
        if alpha_ms < 0 or gigabytes_per_s <= 0:
            raise CostModelError(f"bad transfer prior: alpha_ms={alpha_ms}, gigabytes_per_s={gigabytes_per_s}")
        self._fit = _RidgeFit((alpha_ms, 1.0 / gigabytes_per_s), prior_weight)

    @property
    def alpha_ms(self) -> float:
        return self._fit.coefficients[0]

    @property
    def ms_per_megabyte(self) -> float:
        return self._fit.coefficients[1]

    def cost_ms(self, state_bytes: int) -> float:
        return self.alpha_ms + self.ms_per_megabyte * state_bytes / 1e6

    def observe(self, state_bytes: int, elapsed_ms: float) -> None:
        """Feed one measured transfer of ``state_bytes`` that took ``elapsed_ms`` end to end."""
        if state_bytes < 0 or elapsed_ms < 0:
            raise CostModelError(f"bad transfer sample: state_bytes={state_bytes}, elapsed_ms={elapsed_ms}")
        self._fit.observe((1.0, state_bytes / 1e6), elapsed_ms)


class RestoreCostModel:
    """What a resume's restore adds to its first chunk. The worker streams the state in layer by layer while that
    chunk's first DiT pass runs, each layer's attention waiting only for its own layer's copy, so the chunk loses
    ``max(copy / layers, copy - first_pass_share * chunk * (layers - 1) / layers)``: one layer's copy where the
    link keeps ahead of the pass, else the part of the copy the pass cannot hide. ``layers`` 1 is a restore
    that lands whole before the chunk starts."""

    def __init__(self, copy: TransferCostModel, layers: int, first_pass_share: float) -> None:
        if layers < 1 or not 0.0 <= first_pass_share <= 1.0:
            raise CostModelError(f"bad restore overlap: layers={layers}, first_pass_share={first_pass_share}")
        self.copy = copy
        self.layers = layers
        self.first_pass_share = first_pass_share

    def cost_ms(self, state_bytes: int) -> float:
        """The copy's own time, host to GPU."""
        return self.copy.cost_ms(state_bytes)

    def delay_ms(self, state_bytes: int, chunk_ms: float) -> float:
        """How much later than ``chunk_ms`` the first chunk after the restore arrives."""
        copy_ms = self.copy.cost_ms(state_bytes)
        hidden_ms = self.first_pass_share * chunk_ms * (self.layers - 1) / self.layers
        return max(copy_ms / self.layers, copy_ms - hidden_ms)

    def observe(self, state_bytes: int, elapsed_ms: float) -> None:
        """Feed one measured copy (not the delay: the delay follows from it and the chunk it overlapped)."""
        self.copy.observe(state_bytes, elapsed_ms)


class MigrationCostModel:
    """Time to move a session's state GPU to GPU, fitted per link: within a node (NVLink, or PCIe where a node
    has no NVLink) and across nodes (the network). A move runs at a chunk boundary and occupies both GPUs for
    its whole transfer, so this one figure is both the moving session's pause and the delay of the next batch
    on each of the two GPUs (see ``Workspace.migration_late_chunks``)."""

    def __init__(self, alpha_ms: float, same_node_gigabytes_per_s: float, cross_node_gigabytes_per_s: float) -> None:
        self.same_node = TransferCostModel(alpha_ms, same_node_gigabytes_per_s)
        self.cross_node = TransferCostModel(alpha_ms, cross_node_gigabytes_per_s)

    def link(self, same_node: bool) -> TransferCostModel:
        return self.same_node if same_node else self.cross_node

    def cost_ms(self, state_bytes: int, same_node: bool = False) -> float:
        """Across nodes unless told otherwise: where the two GPUs' nodes are unknown, the slower link."""
        return self.link(same_node).cost_ms(state_bytes)

    def observe(self, state_bytes: int, elapsed_ms: float, same_node: bool = False) -> None:
        self.link(same_node).observe(state_bytes, elapsed_ms)
