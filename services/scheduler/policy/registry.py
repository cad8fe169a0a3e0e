"""Policies by name: families (placement, rebalance, autoscale) and the named combinations, ours and baselines.

``build_controller(name, setting)`` is the one entry point the simulator, the benchmarks and the live scheduler
use, so every one of them runs the very same objects.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from services.scheduler.policy.autoscale import (
    AnticipatoryHeadroom,
    AutoscalePolicy,
    FixedAllocation,
    ReactiveUtilisation,
    RecentRiseHeadroom,
)
from services.scheduler.policy.billing import Billing
from services.scheduler.policy.budget import BudgetParams, ViolationBudget
from services.scheduler.policy.controller import ClosedLoopController, ControllerConfig, Models
from services.scheduler.policy.cost_models import (
    LatencyCurve,
    LatencyModel,
    MigrationCostModel,
    RestoreCostModel,
    TransferCostModel,
)
from services.scheduler.policy.placement import (
    ByMemoryPlacement,
    LeastLoadedPlacement,
    MinBottleneckPlacement,
    PlacementPolicy,
    RoundRobinPlacement,
)
from services.scheduler.policy.rebalance import MinMaxRebalance, NoRebalance, RebalancePolicy

MIGRATION_COOLDOWN_S = 60.0
# Chosen on the synthetic generators only, by bench/choose_settings.py (its output: bench/results/settings.json);
# the ablations of ours take ours' settings.
CHOSEN: dict[str, dict[str, float]] = {
    "ours": {"burst_coverage": 0.6, "overflow_after_s": 1.5, "headroom_floor": 0.55, "budget_aim": 0.5},
    "ours_no_overflow": {"burst_coverage": 0.6, "budget_aim": 0.5},
    "ours_recent_rises": {"recent_rise_quantile": 0.95},
}


class UnknownPolicyError(KeyError):
    """A policy or family member name that is not registered; the message lists the known ones."""


@dataclass(frozen=True, slots=True)
class PolicySetting:
    """The environment a policy is built for. ``fixed_gpus`` sizes the fixed allocations; ``rho`` None lets
    the paper's rule take each detector level's rho. Transfer priors: a migration costs 5 ms plus its bytes
    over NVLink within a node (about 200 GB/s achieved GPU to GPU; a node without NVLink is nearer 25 over
    PCIe) or over the network across nodes (400 Gb/s, 50 GB/s); a restore comes over PCIe Gen5 at 55 GB/s, streamed
    in per layer of the DiT (``restore_layers``, 30 in Wan2.1 1.3B) under the first pass of the resumed chunk, which
    is ``restore_first_pass_share`` of its time (0.15: four sampling steps and the cache write are five DiT passes,
    and the VAE decode takes the rest).
    ``overflow_slots``: sessions past its latency capacity a GPU takes rather than leave one waiting (four: on the
    reference curve eight sessions run as two forwards of four in 726 ms, inside the 750 ms a chunk plays for, so
    the four past capacity miss the target but every stream still plays in real time; their state is 32 GB);
    ``burst_coverage`` and ``overflow_after_s`` and ``headroom_floor`` (how far an underspent violation budget may
    trim the burst headroom, ``BudgetParams.min_scale``) and ``budget_aim`` (the part of the 0.1% it steers to,
    ``BudgetParams.aim``) None: the policy's own chosen values (``CHOSEN``);
    ``spare_gpus``: warm GPUs ours keeps beyond those its active sessions fill; ``recent_rise_quantile`` (None:
    chosen, as ours' settings) and ``recent_rise_window_s``: the candidate sizing of ``ours_recent_rises``
    (``autoscale.RecentRiseHeadroom``; its half hour was looked at on the shared traces: 600, 1800 and 3600 s
    differed little on Mooncake 16 and 64); ``billing_minimum_s`` and
    ``billing_increment_s``: how the cloud bills a GPU (``billing.Billing``; 0 and 0, to the instant, as the
    lower bound assumes)."""

    provisioning_delay_s: float = 30.0
    min_gpus: int = 1
    max_gpus: int = 4096
    target_ms: float = 400.0
    scale_kind: str = "h100"
    curves: Mapping[str, LatencyCurve] = field(default_factory=lambda: {"h100": LatencyCurve()})
    migration_alpha_ms: float = 5.0
    same_node_gigabytes_per_s: float = 200.0
    cross_node_gigabytes_per_s: float = 50.0
    restore_alpha_ms: float = 0.0
    restore_gigabytes_per_s: float = 55.0
    restore_layers: int = 30
    restore_first_pass_share: float = 0.15
    fixed_gpus: int = 1
    rho: float | None = None
    rebalance_interval_s: float = 10.0
    overflow_slots: int = 4
    overflow_after_s: float | None = None
    burst_coverage: float | None = None
    headroom_floor: float | None = None
    budget_aim: float | None = None
    spare_gpus: int = 1
    recent_rise_quantile: float | None = None
    recent_rise_window_s: float = 1800.0
    billing_minimum_s: float = 0.0
    billing_increment_s: float = 0.0

    def __post_init__(self) -> None:
        self.billing()  # a billing no cloud has is refused where the setting is made, for every policy alike

    def billing(self) -> Billing:
        return Billing(self.billing_minimum_s, self.billing_increment_s)

    def models(self) -> Models:
        return Models(
            LatencyModel(dict(self.curves)),
            MigrationCostModel(self.migration_alpha_ms, self.same_node_gigabytes_per_s,
                               self.cross_node_gigabytes_per_s),
            RestoreCostModel(TransferCostModel(self.restore_alpha_ms, self.restore_gigabytes_per_s),
                             self.restore_layers, self.restore_first_pass_share),
        )


PLACEMENTS: dict[str, Callable[[PolicySetting], PlacementPolicy]] = {
    "min_bottleneck": lambda s: MinBottleneckPlacement(restore_aware=False, target_ms=s.target_ms),
    "restore_aware": lambda s: MinBottleneckPlacement(restore_aware=True, target_ms=s.target_ms),
    "round_robin": lambda s: RoundRobinPlacement(),
    "least_loaded": lambda s: LeastLoadedPlacement(),
    "by_memory": lambda s: ByMemoryPlacement(),
}

REBALANCES: dict[str, Callable[[PolicySetting], RebalancePolicy]] = {
    "none": lambda s: NoRebalance(),
    "min_max": lambda s: MinMaxRebalance(
        eta=1.0, min_gain_ms=5.0, max_moves=1_000_000, cooldown_s=0.0, floor_ms=0.0
    ),
    "min_max_cooldown": lambda s: MinMaxRebalance(
        eta=1.0, min_gain_ms=5.0, max_moves=8, cooldown_s=MIGRATION_COOLDOWN_S, floor_ms=s.target_ms
    ),
    "min_max_target": lambda s: MinMaxRebalance(
        eta=1.0, min_gain_ms=5.0, max_moves=8, cooldown_s=0.0, floor_ms=s.target_ms
    ),
}

AUTOSCALES: dict[str, Callable[[PolicySetting], AutoscalePolicy]] = {
    "fixed": lambda s: FixedAllocation(s.fixed_gpus),
    "reactive": lambda s: ReactiveUtilisation(s.rho, s.min_gpus, s.max_gpus, hold_s=5.0),
    "reactive_0.9": lambda s: ReactiveUtilisation(0.9, s.min_gpus, s.max_gpus, hold_s=5.0),
    "anticipatory": lambda s: AnticipatoryHeadroom(
        s.provisioning_delay_s, s.rebalance_interval_s, s.min_gpus, s.max_gpus, _chosen("ours", s)["burst_coverage"],
        s.spare_gpus,
    ),
    "recent_rises": lambda s: RecentRiseHeadroom(
        s.provisioning_delay_s, s.rebalance_interval_s, s.min_gpus, s.max_gpus,
        _chosen("ours_recent_rises", s)["recent_rise_quantile"], s.recent_rise_window_s, s.spare_gpus,
    ),
}


@dataclass(frozen=True, slots=True)
class PolicyRecipe:
    """A named combination: one member of each family, and whether scale-in may migrate to consolidate."""

    placement: str
    rebalance: str
    autoscale: str
    consolidate: bool
    summary: str
    landing_migrations: bool = False
    migration_cooldown_s: float = 0.0
    price_migrations: bool = False
    overflow: bool = False
    keeps_paid_gpus: bool = False


OURS = PolicyRecipe(
    "restore_aware", "min_max_cooldown", "anticipatory", True,
    "closed loop: restore-aware best-fit placement, min-max with cooldown, anticipatory autoscaling, migrations "
    "priced in chunks held up, an overflow slot rather than a long wait",
    landing_migrations=True,
    migration_cooldown_s=MIGRATION_COOLDOWN_S,
    price_migrations=True,
    overflow=True,
    keeps_paid_gpus=True,
)

POLICIES: dict[str, PolicyRecipe] = {
    "ours": OURS,
    "ours_no_overflow": replace(OURS, overflow=False, summary="ours where a session waits for a slot instead of "
                                "taking an overflow slot (isolates the first-chunk rule)"),
    "ours_reactive": replace(OURS, autoscale="reactive", summary="ours with the paper's reactive ceil(N/(K rho)) "
                             "autoscaler (isolates the anticipatory headroom)"),
    "ours_no_cooldown": replace(OURS, rebalance="min_max_target", migration_cooldown_s=0.0,
                                summary="ours without the migration cooldown (isolates it)"),
    "ours_no_landing": replace(OURS, landing_migrations=False,
                               summary="ours without the migrations that make room for resumes (isolates them)"),
    "ours_billing_blind": replace(OURS, keeps_paid_gpus=False, summary="ours releasing a surplus GPU as if it were "
                                  "billed to the instant (isolates keeping paid GPUs)"),
    "ours_no_migration": PolicyRecipe(
        "restore_aware", "none", "anticipatory", False, "ours without any migration (no rebalance, no consolidation)",
        keeps_paid_gpus=True,
    ),
    "ours_no_autoscale": replace(OURS, autoscale="fixed", summary="ours on a fixed pool of fixed_gpus"),
    "ours_recent_rises": replace(OURS, autoscale="recent_rises", summary="ours sized by a quantile of the rises "
                                 "of the last half hour (a candidate, not adopted)"),
    "paper": PolicyRecipe(
        "min_bottleneck", "min_max", "reactive", True, "the paper's rule: min bottleneck, min-max, ceil(N/(K rho))"
    ),
    "fixed": PolicyRecipe("least_loaded", "none", "fixed", False, "fixed allocation of fixed_gpus, least loaded"),
    "round_robin": PolicyRecipe("round_robin", "none", "reactive_0.9", False, "round robin, reactive rho 0.9"),
    "least_loaded": PolicyRecipe("least_loaded", "none", "reactive_0.9", False, "least loaded, reactive rho 0.9"),
    "by_memory": PolicyRecipe("by_memory", "none", "reactive_0.9", False, "most free memory, reactive rho 0.9"),
}


def _chosen(name: str, setting: PolicySetting) -> dict[str, float]:
    """The tunable settings: the setting's own where given, else the policy's chosen values."""
    chosen = {**CHOSEN["ours"], **CHOSEN.get(name, {})}
    return {key: value if (value := getattr(setting, key)) is not None else default for key, default in chosen.items()}


def build_controller(
    name: str, setting: PolicySetting, autoscale: AutoscalePolicy | None = None
) -> ClosedLoopController:
    """A fresh controller for the named policy; each call gets its own state and its own fitted models.
    ``autoscale`` replaces the recipe's sizing rule (a benchmark's reference sizing inside ours' controller)."""
    recipe = POLICIES.get(name)
    if recipe is None:
        raise UnknownPolicyError(f"unknown policy {name!r}; known: {sorted(POLICIES)}")
    chosen = _chosen(name, setting)
    setting = replace(setting, burst_coverage=chosen["burst_coverage"])
    return ClosedLoopController(
        name,
        PLACEMENTS[recipe.placement](setting),
        REBALANCES[recipe.rebalance](setting),
        autoscale or AUTOSCALES[recipe.autoscale](setting),
        setting.models(),
        ControllerConfig(
            setting.scale_kind,
            setting.target_ms,
            setting.rebalance_interval_s,
            recipe.consolidate,
            recipe.landing_migrations,
            recipe.migration_cooldown_s,
            recipe.price_migrations,
            setting.overflow_slots if recipe.overflow else 0,
            chosen["overflow_after_s"],
            setting.billing() if recipe.keeps_paid_gpus else None,
        ),
        budget=ViolationBudget(BudgetParams(aim=chosen["budget_aim"], min_scale=chosen["headroom_floor"])),
    )
