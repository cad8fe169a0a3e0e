"""``turboserve simulate``: replay a trace through one or more policies and print (and optionally plot) them.

``--trace`` names a shared trace (ragpulse, mooncake, synthetic) or is a file in one of ``TRACE_FORMATS``
(docs/simulator.md), so a trace the project never saw runs with one command. ``--model-config`` (resolved by
``services/cli.py``, which may import the worker's model configs) sizes each session's state from a model.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.scheduler.policy.autoscale import AutoscaleError
from services.scheduler.policy.billing import BillingError
from services.scheduler.policy.budget import BudgetError
from services.scheduler.policy.controller import ControllerConfigError
from services.scheduler.policy.registry import CHOSEN, POLICIES, PolicySetting, build_controller
from services.scheduler.sim.converters import TRACE_FORMATS, ConversionAssumptions
from services.scheduler.sim.engine import GPU_USES
from services.scheduler.sim.plots import plot_timelines
from services.scheduler.sim.results import SimResult
from services.scheduler.sim.scenario import (
    TRACE_NAMES,
    Scenario,
    TracesMissingError,
    fixed_sizes,
    load_base_trace,
    load_trace_file,
    policy_setting,
    run_scenario,
    traces_dir,
)
from services.scheduler.sim.trace import Trace, TraceError, active_time_in, lower_bound_gpu_hours, scale_to_mean_active

REPO_ROOT = Path(__file__).resolve().parents[3]
_DEFAULTS = ConversionAssumptions()
_LINKS = PolicySetting()
FIXED_POOLS = ("fixed_peak", "fixed_mean")  # the fixed recipe, sized from the trace (scenario.fixed_sizes)
POLICY_CHOICES = sorted({*POLICIES, *FIXED_POOLS} - {"fixed"})
TUNABLE = tuple(CHOSEN["ours"])  # what --setting may override: the settings bench/choose_settings.py chooses


def _recipe(policy: str) -> str:
    """The registry's name for a ``--policy`` choice."""
    return "fixed" if policy in FIXED_POOLS else policy


def _setting(text: str) -> tuple[str, float]:
    """NAME=VALUE for one of ``TUNABLE``."""
    name, _, value = text.partition("=")
    if name not in TUNABLE:
        raise argparse.ArgumentTypeError(f"{name!r} is not a setting; one of {', '.join(TUNABLE)}")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: {value!r} is not a number") from None


def add_simulate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "simulate", help="replay a session trace through scheduling policies"
    )
    parser.add_argument("--trace", default="mooncake",
                        help=f"a shared trace ({', '.join(TRACE_NAMES)}) or a trace file (then --format)")
    parser.add_argument("--format", choices=sorted(TRACE_FORMATS), default=None,
                        help="the trace file's format (docs/simulator.md)")
    parser.add_argument("--load", type=float, default=64.0,
                        help="time-averaged active sessions after scaling (0: replay a trace file as it is)")
    parser.add_argument("--policy", action="append", choices=POLICY_CHOICES, help="repeatable; default: ours, paper")
    parser.add_argument("--delay-s", type=float, default=30.0, help="GPU provisioning delay")
    parser.add_argument("--rho", type=float, default=None, help="the paper's rule: fixed rho (default per level)")
    parser.add_argument("--seed", type=int, default=0, help="replication seed")
    parser.add_argument("--tokens-per-chunk", type=float, default=_DEFAULTS.output_tokens_per_chunk)
    parser.add_argument("--linger-s", type=float, default=_DEFAULTS.linger_s)
    parser.add_argument("--kv-gb", type=float, default=_DEFAULTS.kv_bytes / 1e9, help="a session's DiT KV cache")
    parser.add_argument("--vae-gb", type=float, default=_DEFAULTS.vae_cache_bytes / 1e9,
                        help="a session's VAE decoder cache")
    parser.add_argument("--model-config", default=None,
                        help="size a session's state from this model config instead (self-forcing, longlive ...)")
    parser.add_argument("--cross-node-gbps", type=float, default=_LINKS.cross_node_gigabytes_per_s,
                        help="GB/s of a migration between nodes")
    parser.add_argument("--same-node-gbps", type=float, default=_LINKS.same_node_gigabytes_per_s,
                        help="GB/s of a migration within a node")
    parser.add_argument("--restore-layers", type=int, default=_LINKS.restore_layers,
                        help="layers a restore streams in under a batch's first DiT pass (1: it lands whole first)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--billing-minimum-s", type=float, default=_LINKS.billing_minimum_s,
                        help="the least a GPU is billed (60 on AWS and GCP)")
    parser.add_argument("--billing-increment-s", type=float, default=_LINKS.billing_increment_s,
                        help="the unit a GPU is billed in beyond the minimum (0: to the instant; 3600: hourly)")
    parser.add_argument("--setting", type=_setting, action="append", default=[], metavar="NAME=VALUE",
                        help=f"repeatable; replaces a chosen setting of ours ({', '.join(TUNABLE)}), to see how "
                             "your own trace answers to it")
    parser.add_argument("--plot", type=Path, default=None, help="write a timeline PNG here")
    parser.add_argument("--json", type=Path, default=None, help="write the result rows here")
    parser.set_defaults(handler=run_simulate)
    return parser


def _progress_callback(progress: Progress, task: TaskID) -> Callable[[float], None]:
    def advance(simulated_s: float) -> None:
        progress.update(task, completed=simulated_s)

    return advance


def _load(args: argparse.Namespace, assumptions: ConversionAssumptions) -> Trace:
    if args.trace in TRACE_NAMES and args.format is None:
        directory = None if args.trace == "synthetic" else traces_dir(REPO_ROOT)
        trace = load_base_trace(args.trace, directory, assumptions)
    elif args.format is None:
        raise TraceError(f"--trace {args.trace!r} is neither a shared trace ({', '.join(TRACE_NAMES)}) nor, "
                         f"without --format ({', '.join(sorted(TRACE_FORMATS))}), a file to read")
    else:
        trace = load_trace_file(Path(args.trace), args.format, assumptions)
    return trace if args.load <= 0 else scale_to_mean_active(trace, args.load, seed=args.seed)


def migrations_per_session_hour(result: SimResult, trace: Trace) -> float:
    hours = active_time_in(trace, trace.window_start_s, trace.window_end_s) / 3600.0
    return result.counters["migrations"] / hours if hours > 0 else 0.0


def run_simulate(args: argparse.Namespace) -> int:
    console = Console()
    if not console.is_terminal:  # a log or a pipe: the whole table, not one squeezed to 80 columns
        console = Console(width=170)
    if args.kv_gb < 0 or args.vae_gb < 0 or args.cross_node_gbps <= 0 or args.same_node_gbps <= 0 \
            or args.gpus_per_node < 1 or args.restore_layers < 1:
        console.print("[red]state sizes must not be negative; link speeds, --restore-layers and --gpus-per-node "
                      "must be positive[/red]")
        return 2
    assumptions = ConversionAssumptions(output_tokens_per_chunk=args.tokens_per_chunk, linger_s=args.linger_s,
                                        kv_bytes=round(args.kv_gb * 1e9), vae_cache_bytes=round(args.vae_gb * 1e9))
    policies = args.policy or ["ours", "paper"]
    links = (("cross_node_gigabytes_per_s", args.cross_node_gbps), ("same_node_gigabytes_per_s", args.same_node_gbps),
             ("restore_layers", args.restore_layers), ("billing_minimum_s", args.billing_minimum_s),
             ("billing_increment_s", args.billing_increment_s), *args.setting)
    try:
        for policy in policies:  # a bad --rho, --setting or billing fails here, before a long trace loads
            build_controller(_recipe(policy), policy_setting(Scenario(policy, args.delay_s, args.rho, setting=links)))
        trace = _load(args, assumptions)
    except (AutoscaleError, BillingError, BudgetError, ControllerConfigError, TracesMissingError, TraceError) as error:
        console.print(f"[red]{error}[/red]")
        return 2
    sizes = fixed_sizes(trace, 4)
    lower_bound = lower_bound_gpu_hours(trace, 4, 1)
    console.print(f"trace {trace.name}: {len(trace.sessions)} sessions, window {trace.window_s / 3600:.2f} h, "
                  f"mean active {trace.mean_active():.1f}, peak {trace.peak_active()}")
    console.print("assumptions: " + ", ".join(f"{k}={v}" for k, v in sorted(trace.assumptions.items())))
    results: list[SimResult] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as progress:
        for policy in policies:
            task = progress.add_task(policy, total=trace.window_s)
            scenario = Scenario(_recipe(policy), args.delay_s, args.rho, sizes.get(policy, sizes["fixed_peak"]),
                                gpus_per_node=args.gpus_per_node, setting=links)
            result = run_scenario(trace, scenario, _progress_callback(progress, task))
            result.policy = policy
            results.append(result)
            progress.update(task, completed=trace.window_s)
    table = Table(title=f"{trace.name} at load {args.load:g}, delay {args.delay_s:g} s (lower bound "
                        f"{lower_bound:.1f} GPU-h)")
    for column in ("policy", "GPU-h", "x LB", f"x LB by use: {'/'.join(GPU_USES)}", "worst ms", "p99 ms",
                   "over target", "first chunk p50/p99/max s",
                   "over target by cause: capacity/waiting/restore/migration", "migr. per session-h",
                   "GB moved per GPU-h", "restores"):
        table.add_column(column)
    for r in results:
        first = "/".join(f"{r.first_chunk_quantile_s(q):.2f}" for q in (0.5, 0.99, 1.0))
        table.add_row(r.policy, f"{r.gpu_hours:.1f}", f"{r.gpu_hours / lower_bound:.2f}",
                      "/".join(f"{hours / lower_bound:.2f}" for hours in r.gpu_hours_by_use.values()),
                      f"{r.worst_latency_ms:.0f}", f"{r.p99_latency_ms:.0f}", f"{r.over_target_frac:.4%}", first,
                      "/".join(f"{share:.4%}" for share in r.over_target_by_cause().values()),
                      f"{migrations_per_session_hour(r, trace):.2f}",
                      f"{r.counters['migrated_bytes'] / 1e9 / max(r.gpu_hours, 1e-9):.1f}", str(r.counters["restores"]))
    console.print(table)
    if args.plot is not None:
        plot_timelines(results, f"{trace.name} at load {args.load:g}", args.plot)
    if args.json is not None:
        args.json.write_text(json.dumps([{**r.summary(), "lower_bound_gpu_hours": lower_bound} for r in results],
                                        indent=1))
    return 0
