"""A reproducible simulation scenario: which trace, at what load, under which delay, run by which policy.

Both the ``turboserve simulate`` command and ``bench/policies.py`` build their runs here, so a figure in the
report can be reproduced from the command line with the same names.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.scheduler.policy.autoscale import AutoscalePolicy
from services.scheduler.policy.registry import PolicySetting, build_controller
from services.scheduler.sim.converters import TRACE_FORMATS, ConversionAssumptions, load_mooncake, load_ragpulse
from services.scheduler.sim.engine import SimConfig, Simulator
from services.scheduler.sim.results import SimResult
from services.scheduler.sim.synthetic import SyntheticSpec, generate
from services.scheduler.sim.trace import Trace, TraceError, busiest_window, scale_to_mean_active

TRACE_FILES = {"ragpulse": "0_trace.jsonl", "mooncake": "conversation_trace.jsonl"}
TRACE_NAMES = (*TRACE_FILES, "synthetic")


class TracesMissingError(FileNotFoundError):
    """The shared traces directory cannot be found; the message says where it looked."""


def traces_dir(repo_root: Path) -> Path:
    """``TURBOSERVE_TRACES`` if set, else ``../shared/traces`` relative to the repository root."""
    configured = os.environ.get("TURBOSERVE_TRACES")
    path = Path(configured) if configured else (repo_root / ".." / "shared" / "traces").resolve()
    if not path.is_dir():
        raise TracesMissingError(
            f"trace directory {path} not found: set TURBOSERVE_TRACES or put the shared traces at ../shared/traces"
        )
    return path


def load_base_trace(name: str, directory: Path | None, assumptions: ConversionAssumptions) -> Trace:
    """The unscaled trace: the busiest 24 h of RAGPulse, Mooncake whole, or a synthetic day."""
    if name == "synthetic":
        return generate(SyntheticSpec(duration_s=86400.0, mean_active=16.0, state_bytes=assumptions.state_bytes))
    if name not in TRACE_FILES or directory is None:
        raise TraceError(f"unknown trace {name!r}; known: {TRACE_NAMES}")
    path = directory / TRACE_FILES[name]
    if not path.is_file():
        raise TracesMissingError(f"trace file {path} not found")
    if name == "ragpulse":
        return busiest_window(load_ragpulse(path, assumptions), 86400.0)
    return load_mooncake(path, assumptions)


@functools.cache
def _default_base_trace(name: str, directory: Path) -> Trace:
    return load_base_trace(name, directory, ConversionAssumptions())


def shared_trace(name: str, directory: Path, load: float, seed: int) -> Trace:
    """A shared trace at mean active ``load``, replicated with ``seed``'s shifts, under the default conversion: what
    every benchmark replays, so their figures for one (trace, load, seed) are of the same sessions. The unscaled
    trace is read once per process."""
    return scale_to_mean_active(_default_base_trace(name, directory), float(load), seed=seed)


def load_trace_file(path: Path, trace_format: str, assumptions: ConversionAssumptions) -> Trace:
    """A trace the project never saw, whole, in one of ``TRACE_FORMATS`` (see docs/simulator.md)."""
    loader = TRACE_FORMATS.get(trace_format)
    if loader is None:
        raise TraceError(f"unknown trace format {trace_format!r}; known: {sorted(TRACE_FORMATS)}")
    if not path.is_file():
        raise TracesMissingError(f"trace file {path} not found")
    return loader(path, assumptions)


@dataclass(frozen=True, slots=True)
class Scenario:
    """One replay's knobs. ``fixed_gpus`` 0 means: size fixed pools from the trace (peak, mean); ``setting``
    holds any other policy setting by name (``burst_coverage``, ``cross_node_gigabytes_per_s`` ...)."""

    policy: str
    delay_s: float = 30.0
    rho: float | None = None
    fixed_gpus: int = 1
    capacity: int = 4
    target_ms: float = 400.0
    min_gpus: int = 1
    gpus_per_node: int = 8
    setting: tuple[tuple[str, float], ...] = ()


def fixed_sizes(trace: Trace, capacity: int) -> dict[str, int]:
    """GPU counts of the fixed baselines: sized for the peak and for the mean active count."""
    return {
        "fixed_peak": max(1, math.ceil(trace.peak_active() / capacity)),
        "fixed_mean": max(1, math.ceil(trace.mean_active() / capacity)),
    }


def policy_setting(scenario: Scenario) -> PolicySetting:
    """What the scenario's policy is built for. Building it (``build_controller``) is where a bad setting raises its
    typed error, so a command can check its scenarios before it loads a trace."""
    return PolicySetting(
        provisioning_delay_s=scenario.delay_s,
        min_gpus=scenario.min_gpus,
        target_ms=scenario.target_ms,
        fixed_gpus=scenario.fixed_gpus,
        rho=scenario.rho,
        **dict(scenario.setting),  # type: ignore[arg-type]
    )


def run_scenario(trace: Trace, scenario: Scenario, progress: Callable[[float], None] | None = None,
                 autoscale: AutoscalePolicy | None = None) -> SimResult:
    """``autoscale``: a sizing rule in place of the policy's own (see ``build_controller``)."""
    setting = policy_setting(scenario)
    controller = build_controller(scenario.policy, setting, autoscale)
    truth = setting.models()
    config = SimConfig(
        provisioning_delay_s=scenario.delay_s,
        target_ms=scenario.target_ms,
        gpu_capacity=scenario.capacity,
        min_gpus=scenario.min_gpus,
        gpus_per_node=scenario.gpus_per_node,
        overflow_slots=setting.overflow_slots,
        billing=setting.billing(),
        chunk_interval_s=float(trace.assumptions.get("chunk_interval_s", 0.75)),
    )
    simulator = Simulator(trace, controller, config, truth.latency, truth.migration, truth.restore, progress)
    return simulator.run()
