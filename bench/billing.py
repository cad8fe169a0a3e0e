"""What the cloud's billing model does to a pool's cost, and what keeping GPUs that are paid for anyway saves.

The policy report bills by the instant, as the lower bound assumes. Clouds do not all: AWS and GCP charge a minute
at least, others by the hour. Here ours, ours releasing as if billed by the instant (``ours_billing_blind``) and the
paper's rule (per level) replay the shared traces under three billing models: to the instant, per minute (60 s at
least, then per second) and hourly. Mooncake runs at loads 16, 64 and 256 on seeds 0-9 by the instant and per
minute (an hour-long trace says nothing about hourly billing); RAGPulse's busiest day at loads 16 and 64 on seed 0
under all three. Costs are against the same lower bound, billed by the instant, so a billing model's waste shows.
Writes bench/results/billing.json and bench/results/billing.png.

    .venv/bin/python bench/billing.py            # about 10 min on 2 cores
    .venv/bin/python bench/billing.py --replot   # the PNG again from the recorded JSON
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO_ROOT)  # in place of bench/, whose kernels.py would shadow the `kernels` package

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from services.scheduler.sim.scenario import (  # noqa: E402
    Scenario,
    TracesMissingError,
    run_scenario,
    shared_trace,
    traces_dir,
)
from services.scheduler.sim.trace import lower_bound_gpu_hours  # noqa: E402

BILLINGS = {"instant": (0.0, 0.0), "per_minute": (60.0, 0.0), "hourly": (3600.0, 3600.0)}  # (minimum, increment)
POLICIES = ("ours", "ours_billing_blind", "paper")
CELLS = [("mooncake", load, seed, billing) for load in (16, 64, 256) for seed in range(10)
         for billing in ("instant", "per_minute")]
CELLS += [("ragpulse", load, 0, billing) for load in (16, 64) for billing in BILLINGS]
Row = dict[str, Any]


def replay(job: tuple[Path, str, int, int, str, str]) -> Row:
    directory, name, load, seed, billing, policy = job
    trace = shared_trace(name, directory, load, seed)
    minimum_s, increment_s = BILLINGS[billing]
    setting = (("billing_minimum_s", minimum_s), ("billing_increment_s", increment_s))
    result = run_scenario(trace, Scenario(policy, 30.0, setting=setting))
    lower_bound = lower_bound_gpu_hours(trace, 4, 1)
    return {"trace": name, "load": load, "seed": seed, "billing": billing, "policy": policy,
            "gpu_hours": round(result.gpu_hours, 3), "cost_vs_lower_bound": round(result.gpu_hours / lower_bound, 4),
            **{f"{use}_vs_lower_bound": round(hours / lower_bound, 4)
               for use, hours in result.gpu_hours_by_use.items()},
            "over_target_frac": result.over_target_frac, "gpus_added": result.counters["gpus_added"]}


def summarise(rows: list[Row]) -> list[Row]:
    """Per trace, load, billing model and policy: the mean and worst seed, and what ours saves against the same
    policy releasing as if billed by the instant (mean over seeds of its per-seed saving)."""
    by_key = {(r["trace"], r["load"], r["seed"], r["billing"], r["policy"]): r for r in rows}
    summary = []
    groups = sorted({(r["trace"], r["load"], r["billing"], r["policy"]) for r in rows},
                    key=lambda g: (g[0], g[1], list(BILLINGS).index(g[2]), POLICIES.index(g[3])))
    for name, load, billing, policy in groups:
        group = [r for r in rows if (r["trace"], r["load"], r["billing"], r["policy"]) == (name, load, billing, policy)]
        costs = [r["cost_vs_lower_bound"] for r in group]
        entry: Row = {"trace": name, "load": load, "billing": billing, "policy": policy, "seeds": len(group),
                      "cost_vs_lower_bound_mean": round(sum(costs) / len(costs), 4),
                      "cost_vs_lower_bound_worst": max(costs),
                      "after_release_vs_lower_bound_mean": round(
                          sum(r["after_release_vs_lower_bound"] for r in group) / len(group), 4),
                      "over_target_frac_worst": max(r["over_target_frac"] for r in group)}
        if policy == "ours":
            savings = [1 - r["gpu_hours"] / by_key[(name, load, r["seed"], billing, "ours_billing_blind")]["gpu_hours"]
                       for r in group]
            entry["saving_vs_blind_mean"] = round(sum(savings) / len(savings), 4)
        summary.append(entry)
    return summary


def print_summary(summary: list[Row], console: Console) -> None:
    table = Table(title="cost by billing model: GPU-hours over the lower bound billed by the instant")
    for column in ("trace", "load", "billing", "policy", "seeds", "x LB mean / worst", "billed after release",
                   "over target, worst", "ours saves vs blind"):
        table.add_column(column)
    for r in summary:
        saving = r.get("saving_vs_blind_mean")
        table.add_row(r["trace"], str(r["load"]), r["billing"], r["policy"], str(r["seeds"]),
                      f"{r['cost_vs_lower_bound_mean']:.3f} / {r['cost_vs_lower_bound_worst']:.3f}",
                      f"{r['after_release_vs_lower_bound_mean']:.3f}", f"{r['over_target_frac_worst']:.3%}",
                      "" if saving is None else f"{saving:.1%}")
    console.print(table)


def plot(summary: list[Row], path: Path) -> None:
    """One panel per trace and load: mean cost per billing model, a bar per policy."""
    cells = sorted({(r["trace"], r["load"]) for r in summary})
    figure, axes = plt.subplots(1, len(cells), figsize=(3.6 * len(cells), 4.2), squeeze=False)
    width = 0.8 / len(POLICIES)
    for axis, (name, load) in zip(axes.flat, cells, strict=True):
        shown = {r["billing"] for r in summary if (r["trace"], r["load"]) == (name, load)}
        billings = [billing for billing in BILLINGS if billing in shown]
        for index, policy in enumerate(POLICIES):
            costs = [next(r["cost_vs_lower_bound_mean"] for r in summary
                          if (r["trace"], r["load"], r["billing"], r["policy"]) == (name, load, billing, policy))
                     for billing in billings]
            bars = axis.bar([i + index * width for i in range(len(billings))], costs, width, label=policy)
            axis.bar_label(bars, fmt="%.2f", fontsize=6)
        axis.set_xticks([i + width for i in range(len(billings))], billings, fontsize=8)
        axis.set_yscale("log")  # an hourly bill is ten times the rest; a per-minute one differs by a few percent
        axis.set_ylim(bottom=0.9)
        axis.set_title(f"{name}, load {load}", fontsize=9)
        axis.set_ylabel("GPU-hours / lower bound, mean over seeds", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description="cost under three billing models")
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from bench/results/billing.json")
    args = parser.parse_args()
    out = REPO_ROOT / "bench" / "results"
    if args.replot:
        plot(json.loads((out / "billing.json").read_text())["summary"], out / "billing.png")
        return 0
    console = Console(width=150)
    try:
        directory = traces_dir(REPO_ROOT)
    except TracesMissingError as error:
        console.print(f"[red]{error}[/red]")
        return 2
    jobs = [(directory, *cell, policy) for cell, policy in itertools.product(CELLS, POLICIES)]
    jobs.sort(key=lambda job: job[1] != "ragpulse")  # the long days first, so the pool ends evenly
    rows: list[Row] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress, multiprocessing.Pool(2) as pool:
        task = progress.add_task("replaying", total=len(jobs))
        for row in pool.imap_unordered(replay, jobs):
            rows.append(row)
            progress.update(task, advance=1, description=f"{row['trace']} {row['load']} {row['billing']}")
    rows.sort(key=lambda r: (r["trace"], r["load"], r["seed"], r["billing"], r["policy"]))
    summary = summarise(rows)
    print_summary(summary, console)
    out.mkdir(parents=True, exist_ok=True)
    (out / "billing.json").write_text(json.dumps(
        {"billings": {k: {"minimum_s": m, "increment_s": i} for k, (m, i) in BILLINGS.items()},
         "summary": summary, "rows": rows}, indent=1) + "\n")
    plot(summary, out / "billing.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
