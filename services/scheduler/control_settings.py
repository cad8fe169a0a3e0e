"""The control loop's typed settings (read once from the environment), and what they build: the controller
from the policy registry, and the provisioner TURBOSERVE_PROVISIONER names."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from services.common.config import ConfigError, env_float, env_int, env_str
from services.scheduler.policy import POLICIES, ClosedLoopController, PolicySetting, build_controller
from services.scheduler.policy.cost_models import LatencyCurve
from services.scheduler.policy.detector import WorkloadDetector
from services.scheduler.provisioners import Provisioner
from services.scheduler.provisioners.external import ExternalProvisioner, Publish
from services.scheduler.provisioners.kubernetes import KubernetesProvisioner, connect_apps_api
from services.scheduler.provisioners.local import LocalProcessProvisioner

ProvisionerKind = Literal["local", "kubernetes", "external"]
PAPER_DETECTOR_WINDOW_S = 300.0


@dataclass(frozen=True, slots=True)
class ControlSettings:
    """How the live closed loop runs; defaults are the production ones, tests shrink the time scales."""

    provisioner: ProvisionerKind = "external"
    """local | kubernetes | external (TURBOSERVE_PROVISIONER; `turboserve up` sets local)."""
    policy: str = "ours"
    """A name from the policy registry (TURBOSERVE_POLICY)."""
    control_period_s: float = 2.0
    """A decision at least this often, besides every scheduling event (TURBOSERVE_CONTROL_PERIOD_S, 0.05-600)."""
    rebalance_interval_s: float = 10.0
    """Min-max rebalancing at most this often (TURBOSERVE_REBALANCE_S, 0.1-3600)."""
    min_gpus: int = 1
    """Fewest workers the loop keeps (TURBOSERVE_MIN_GPUS, 0-4096)."""
    max_gpus: int = 8
    """Most workers the loop asks for (TURBOSERVE_MAX_GPUS, 1-4096, >= min)."""
    provisioning_delay_s: float = 30.0
    """Expected time from asking for a worker to its first heartbeat (TURBOSERVE_PROVISIONING_DELAY_S, 0-3600)."""
    provision_timeout_s: float = 300.0
    """A worker asked for that has not heart-beaten by then is given up (TURBOSERVE_PROVISION_TIMEOUT_S, 1-86400)."""
    scale_in_hold_s: float | None = None
    """Fewer workers must suffice this long before one is released; unset: the workload level's hold
    (TURBOSERVE_SCALE_IN_HOLD_S, 0-3600)."""
    detector_window_s: float = PAPER_DETECTOR_WINDOW_S
    """Workload detector window; its recent window and smoothing scale with it (TURBOSERVE_DETECTOR_WINDOW_S)."""
    burst_coverage: float | None = None
    """How much of its learnt burst headroom the autoscaler keeps; unset: the policy's own, chosen on synthetic
    days (TURBOSERVE_BURST_COVERAGE, 0-4)."""
    spare_gpus: int = 1
    """Warm GPUs the autoscaler keeps beyond those the active sessions fill (TURBOSERVE_SPARE_GPUS, 0-64)."""
    billing_minimum_s: float = 0.0
    """The least the cloud bills a worker, from when it is asked for: a surplus worker is kept while it is paid
    for (TURBOSERVE_BILLING_MINIMUM_S, 0-86400; 60 on AWS and GCP)."""
    billing_increment_s: float = 0.0
    """The unit the cloud bills a worker in beyond the minimum, 0 to the instant (TURBOSERVE_BILLING_INCREMENT_S,
    0-86400; 3600 hourly)."""
    target_ms: float = 400.0
    """Per-chunk latency target (TURBOSERVE_TARGET_MS, 1-100000)."""
    worker_kind: str = "cpu"
    """The kind new workers report (TURBOSERVE_WORKER_KIND, else TURBOSERVE_DEVICE's type)."""
    worker_capacity: int = 4
    """K of new workers (TURBOSERVE_WORKER_CAPACITY, 1-64)."""
    retire_grace_s: float = 30.0
    """A removed worker that still heart-beats stays out of the pool this long (TURBOSERVE_RETIRE_GRACE_S)."""
    local_workers: int = 1
    """Workers the local provisioner starts with (TURBOSERVE_LOCAL_WORKERS, clamped to [min, max])."""
    log_dir: str = ""
    """Where the local provisioner's workers log (TURBOSERVE_LOG_DIR, default a new temp dir)."""
    k8s_namespace: str = "turboserve"
    """Namespace of the worker StatefulSet (TURBOSERVE_K8S_NAMESPACE)."""
    k8s_statefulset: str = "turboserve-worker"
    """Name of the worker StatefulSet (TURBOSERVE_K8S_STATEFULSET)."""

    def __post_init__(self) -> None:
        if self.provisioner not in ("local", "kubernetes", "external"):
            raise ConfigError(f"TURBOSERVE_PROVISIONER={self.provisioner!r} is not local, kubernetes or external")
        if self.policy not in POLICIES:
            raise ConfigError(f"TURBOSERVE_POLICY={self.policy!r} is not one of {sorted(POLICIES)}")
        if self.max_gpus < max(self.min_gpus, 1):
            raise ConfigError(f"TURBOSERVE_MAX_GPUS={self.max_gpus} is below TURBOSERVE_MIN_GPUS={self.min_gpus}")

    @classmethod
    def from_env(cls) -> ControlSettings:
        hold = os.environ.get("TURBOSERVE_SCALE_IN_HOLD_S")
        min_gpus = env_int("TURBOSERVE_MIN_GPUS", 1, low=0, high=4096)
        return cls(
            provisioner=cast(ProvisionerKind, env_str("TURBOSERVE_PROVISIONER", "external")),
            policy=env_str("TURBOSERVE_POLICY", "ours"),
            control_period_s=env_float("TURBOSERVE_CONTROL_PERIOD_S", 2.0, low=0.05, high=600.0),
            rebalance_interval_s=env_float("TURBOSERVE_REBALANCE_S", 10.0, low=0.1, high=3600.0),
            min_gpus=min_gpus,
            max_gpus=env_int("TURBOSERVE_MAX_GPUS", 8, low=1, high=4096),
            provisioning_delay_s=env_float("TURBOSERVE_PROVISIONING_DELAY_S", 30.0, low=0.0, high=3600.0),
            provision_timeout_s=env_float("TURBOSERVE_PROVISION_TIMEOUT_S", 300.0, low=1.0, high=86400.0),
            scale_in_hold_s=None if hold is None else env_float("TURBOSERVE_SCALE_IN_HOLD_S", 0.0, low=0.0,
                                                                 high=3600.0),
            detector_window_s=env_float("TURBOSERVE_DETECTOR_WINDOW_S", PAPER_DETECTOR_WINDOW_S, low=1.0,
                                        high=86400.0),
            burst_coverage=None if os.environ.get("TURBOSERVE_BURST_COVERAGE") is None
            else env_float("TURBOSERVE_BURST_COVERAGE", 0.0, low=0.0, high=4.0),
            spare_gpus=env_int("TURBOSERVE_SPARE_GPUS", 1, low=0, high=64),
            billing_minimum_s=env_float("TURBOSERVE_BILLING_MINIMUM_S", 0.0, low=0.0, high=86400.0),
            billing_increment_s=env_float("TURBOSERVE_BILLING_INCREMENT_S", 0.0, low=0.0, high=86400.0),
            target_ms=env_float("TURBOSERVE_TARGET_MS", 400.0, low=1.0, high=100000.0),
            worker_kind=env_str("TURBOSERVE_WORKER_KIND", env_str("TURBOSERVE_DEVICE", "cpu").split(":")[0]),
            worker_capacity=env_int("TURBOSERVE_WORKER_CAPACITY", 4, low=1, high=64),
            retire_grace_s=env_float("TURBOSERVE_RETIRE_GRACE_S", 30.0, low=0.0, high=86400.0),
            local_workers=env_int("TURBOSERVE_LOCAL_WORKERS", max(min_gpus, 1), low=0, high=4096),
            log_dir=env_str("TURBOSERVE_LOG_DIR", ""),
            k8s_namespace=env_str("TURBOSERVE_K8S_NAMESPACE", "turboserve"),
            k8s_statefulset=env_str("TURBOSERVE_K8S_STATEFULSET", "turboserve-worker"),
        )

    @property
    def initial_workers(self) -> int:
        return min(max(self.local_workers, self.min_gpus), self.max_gpus)


def build_live_controller(settings: ControlSettings) -> ClosedLoopController:
    """The registry's controller, on the live time scale: the detector window and scale-in hold are the two
    knobs a deployment (or an end-to-end test) shortens; everything else is the simulator's policy as is."""
    setting = PolicySetting(
        provisioning_delay_s=settings.provisioning_delay_s, min_gpus=settings.min_gpus,
        max_gpus=settings.max_gpus, target_ms=settings.target_ms, scale_kind=settings.worker_kind,
        curves={settings.worker_kind: LatencyCurve(capacity=settings.worker_capacity)},
        rebalance_interval_s=settings.rebalance_interval_s,
        burst_coverage=settings.burst_coverage, spare_gpus=settings.spare_gpus,
        billing_minimum_s=settings.billing_minimum_s, billing_increment_s=settings.billing_increment_s,
    )
    controller = build_controller(settings.policy, setting)
    if settings.detector_window_s != PAPER_DETECTOR_WINDOW_S:
        window_s = settings.detector_window_s
        controller.detector = WorkloadDetector(window_s=window_s, recent_s=window_s / 10)
    if settings.scale_in_hold_s is not None:
        controller.autoscale.hold_s = settings.scale_in_hold_s
    return controller


def build_provisioner(settings: ControlSettings, publish: Publish) -> tuple[Provisioner, float]:
    """The provisioner and how long a worker it removed stays out of the pool: an external system may never
    act on a decision, so there a removed worker that keeps beating is back in the pool at once."""
    if settings.provisioner == "local":
        log_dir = Path(settings.log_dir or tempfile.mkdtemp(prefix="turboserve-workers-"))
        return LocalProcessProvisioner(dict(os.environ), log_dir), settings.retire_grace_s
    if settings.provisioner == "kubernetes":
        api = connect_apps_api()
        provisioner = KubernetesProvisioner(api, namespace=settings.k8s_namespace,
                                            statefulset=settings.k8s_statefulset)
        return provisioner, settings.retire_grace_s
    return ExternalProvisioner(publish), 0.0
