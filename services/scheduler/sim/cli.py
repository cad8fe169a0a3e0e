"""``turboserve simulate``: replay a trace through one or more policies and print (and optionally plot) them."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.scheduler.policy.registry import POLICIES
from services.scheduler.sim.converters import ConversionAssumptions
from services.scheduler.sim.plots import plot_timelines
from services.scheduler.sim.results import SimResult
from services.scheduler.sim.scenario import (
    TRACE_NAMES,
    Scenario,
    TracesMissingError,
    fixed_sizes,
    load_base_trace,
    run_scenario,
    traces_dir,
)
from services.scheduler.sim.trace import TraceError, lower_bound_gpu_hours, scale_to_mean_active

REPO_ROOT = Path(__file__).resolve().parents[3]
_DEFAULTS = ConversionAssumptions()
POLICY_CHOICES = sorted({*POLICIES, "fixed_peak", "fixed_mean"} - {"fixed"})


def add_simulate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "simulate", help="replay a session trace through scheduling policies"
    )
    parser.add_argument("--trace", choices=TRACE_NAMES, default="mooncake")
    parser.add_argument("--load", type=float, default=64.0, help="time-averaged active sessions after scaling")
    parser.add_argument("--policy", action="append", choices=POLICY_CHOICES, help="repeatable; default: ours, paper")
    parser.add_argument("--delay-s", type=float, default=30.0, help="GPU provisioning delay")
    parser.add_argument("--rho", type=float, default=None, help="the paper's rule: fixed rho (default per level)")
    parser.add_argument("--seed", type=int, default=0, help="replication seed")
    parser.add_argument("--tokens-per-chunk", type=float, default=_DEFAULTS.output_tokens_per_chunk)
    parser.add_argument("--linger-s", type=float, default=_DEFAULTS.linger_s)
    parser.add_argument("--plot", type=Path, default=None, help="write a timeline PNG here")
    parser.add_argument("--json", type=Path, default=None, help="write the result rows here")
    parser.set_defaults(handler=run_simulate)
    return parser


def _progress_callback(progress: Progress, task: TaskID) -> Callable[[float], None]:
    def advance(simulated_s: float) -> None:
        progress.update(task, completed=simulated_s)

    return advance


def run_simulate(args: argparse.Namespace) -> int:
    console = Console()
    assumptions = ConversionAssumptions(output_tokens_per_chunk=args.tokens_per_chunk, linger_s=args.linger_s)
    try:
        directory = None if args.trace == "synthetic" else traces_dir(REPO_ROOT)
        trace = scale_to_mean_active(load_base_trace(args.trace, directory, assumptions), args.load, seed=args.seed)
    except (TracesMissingError, TraceError) as error:
        console.print(f"[red]{error}[/red]")
        return 2
    sizes = fixed_sizes(trace, 4)
    lower_bound = lower_bound_gpu_hours(trace, 4, 1)
    console.print(f"trace {trace.name}: {len(trace.sessions)} sessions, window {trace.window_s / 3600:.2f} h, "
                  f"mean active {trace.mean_active():.1f}, peak {trace.peak_active()}")
    console.print("assumptions: " + ", ".join(f"{k}={v}" for k, v in sorted(trace.assumptions.items())))
    results: list[SimResult] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as progress:
        for policy in args.policy or ["ours", "paper"]:
            task = progress.add_task(policy, total=trace.window_s)
            name = "fixed" if policy in sizes else policy
            scenario = Scenario(name, args.delay_s, args.rho, sizes.get(policy, sizes["fixed_peak"]))
            result = run_scenario(trace, scenario, _progress_callback(progress, task))
            result.policy = policy
            results.append(result)
            progress.update(task, completed=trace.window_s)
    table = Table(title=f"{trace.name} at load {args.load:g}, delay {args.delay_s:g} s (lower bound "
                        f"{lower_bound:.1f} GPU-h)")
    for column in ("policy", "GPU-h", "x LB", "worst ms", "p99 ms", "over target", "migrations", "restores"):
        table.add_column(column)
    for r in results:
        table.add_row(r.policy, f"{r.gpu_hours:.1f}", f"{r.gpu_hours / lower_bound:.2f}",
                      f"{r.worst_latency_ms:.0f}", f"{r.p99_latency_ms:.0f}", f"{r.over_target_frac:.4%}",
                      str(r.counters["migrations"]), str(r.counters["restores"]))
    console.print(table)
    if args.plot is not None:
        plot_timelines(results, f"{trace.name} at load {args.load:g}", args.plot)
    if args.json is not None:
        args.json.write_text(json.dumps([{**r.summary(), "lower_bound_gpu_hours": lower_bound} for r in results],
                                        indent=1))
    return 0
