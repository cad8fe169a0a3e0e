"""What sizing the pool could reach with perfect knowledge of the load's statistics, beside ours.

The cost targets are judged on the worst seed, and ours misses some at loads 16 and 64. The clairvoyant bound
says what knowing every arrival would cost; this says what knowing only the load's statistics would: ours'
controller with its headroom told by ``sim.forecast`` (at every second, a quantile of the rise over the next 40 s,
read from 30 other replications of the same trace, seeds 1000-1029) instead of learnt from the past. The quantile
is swept; the cheapest one within 0.1% of chunks over target on every seed is the reference. A target below it
asks for knowing which sessions come, not only how many are likely to. Ours replays in the same run, and so
does a causal candidate at loads 16 and 64, where ours misses: ``ours_recent_rises``, sized by a quantile of the
rises seen in the last half hour (``autoscale.RecentRiseHeadroom``), swept over its quantile too.
Shared traces at loads 16, 64 and 256: Mooncake on seeds 0-9, RAGPulse's busiest day on seeds 0-2, as the policy
report. Writes bench/results/forecast_bound.json and bench/results/forecast_bound.png.

    .venv/bin/python bench/forecast_bound.py            # 45 to 60 min on 2 cores
    .venv/bin/python bench/forecast_bound.py --replot   # the tables and the PNG again from the recorded rows
    .venv/bin/python bench/forecast_bound.py --only ours   # replay one sizing after a change to it, keep the rest
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO_ROOT)  # in place of bench/, whose kernels.py would shadow the `kernels` package

from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from services.scheduler.sim.forecast import ForecastHeadroom, RiseForecast, forecast_rises  # noqa: E402
from services.scheduler.sim.plots import plot_frontier  # noqa: E402
from services.scheduler.sim.scenario import (  # noqa: E402
    Scenario,
    TracesMissingError,
    policy_setting,
    run_scenario,
    shared_trace,
    traces_dir,
)
from services.scheduler.sim.trace import (  # noqa: E402
    clairvoyant_gpu_hours,
    lower_bound_gpu_hours,
)

SEEDS = {"ragpulse": 3, "mooncake": 10}
LOADS = (16, 64, 256)
COST_TARGETS = {16: 1.5, 64: 1.3, 256: 1.2}
OVER_TARGET_BUDGET = 0.001
QUANTILES = (0.8, 0.9, 0.92, 0.95, 0.97, 0.99)
CANDIDATE_QUANTILES, CANDIDATE_LOADS = (0.9, 0.92, 0.95, 0.97), (16, 64)  # where ours misses
REPLICATION_SEEDS = range(1000, 1030)  # never a seed the report judges on
SIZINGS = ("ours", "forecast", "recent")
DELAY_S = 30.0
Row = dict[str, Any]


def forecasts(directory: Path, name: str, load: int) -> dict[float, RiseForecast]:
    setting = policy_setting(Scenario("ours", DELAY_S))
    horizon_s = setting.provisioning_delay_s + setting.rebalance_interval_s  # ours' horizon
    replications = [shared_trace(name, directory, load, seed) for seed in REPLICATION_SEEDS]
    return forecast_rises(replications, horizon_s, QUANTILES)


@dataclass(frozen=True, slots=True)
class Job:
    """One replay: ``sizing`` ours, forecast (told ``forecast``) or recent (``ours_recent_rises`` at ``quantile``)."""

    name: str
    load: int
    seed: int
    sizing: str
    quantile: float | None = None
    forecast: RiseForecast | None = None


def replay(args: tuple[Path, Job]) -> Row:
    directory, job = args
    trace = shared_trace(job.name, directory, job.load, job.seed)
    scenario = Scenario("ours", DELAY_S)
    autoscale = None
    if job.forecast is not None:
        setting = policy_setting(scenario)
        autoscale = ForecastHeadroom(job.forecast, setting.min_gpus, setting.max_gpus, setting.spare_gpus)
    if job.sizing == "recent":
        scenario = Scenario("ours_recent_rises", DELAY_S, setting=(("recent_rise_quantile", job.quantile),))
    result = run_scenario(trace, scenario, autoscale=autoscale)
    lower_bound = lower_bound_gpu_hours(trace, 4, 1)
    return {"trace": job.name, "load": job.load, "seed": job.seed, "sizing": job.sizing, "quantile": job.quantile,
            "cost_vs_lower_bound": round(result.gpu_hours / lower_bound, 4),
            "clairvoyant_vs_lower_bound": round(clairvoyant_gpu_hours(trace, 4, 1, DELAY_S) / lower_bound, 4),
            "over_target_frac": result.over_target_frac,
            "first_chunk_max_s": round(result.first_chunk_quantile_s(1.0), 3)}


def summarise(rows: list[Row]) -> list[Row]:
    """Per cell and sizing: worst and mean over seeds, and whether both targets hold on every seed."""
    groups: dict[tuple[str, int, str, float | None], list[Row]] = {}
    for r in rows:
        groups.setdefault((r["trace"], r["load"], r["sizing"], r["quantile"]), []).append(r)
    summary = []
    for (name, load, sizing, quantile), group in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1], g[0][2],
                                                                                        g[0][3] or 0.0)):
        worst_cost = max(r["cost_vs_lower_bound"] for r in group)
        worst_over = max(r["over_target_frac"] for r in group)
        summary.append({
            "trace": name, "load": load, "sizing": sizing, "quantile": quantile, "seeds": len(group),
            "cost_vs_lower_bound_worst": worst_cost,
            "cost_vs_lower_bound_mean": round(sum(r["cost_vs_lower_bound"] for r in group) / len(group), 4),
            "over_target_frac_worst": worst_over,
            "over_target_frac_mean": sum(r["over_target_frac"] for r in group) / len(group),
            "clairvoyant_vs_lower_bound_worst": max(r["clairvoyant_vs_lower_bound"] for r in group),
            "first_chunk_max_s_worst": max(r["first_chunk_max_s"] for r in group),
            "meets_both": worst_cost <= COST_TARGETS[load] and worst_over <= OVER_TARGET_BUDGET,
        })
    return summary


SWEPT = {"forecast": "forecast", "recent": "recent rises"}  # the sizings swept over a quantile, as reported


def references(summary: list[Row]) -> list[Row]:
    """Per cell: ours, and each swept sizing's cheapest quantile within the violation budget on every seed (absent
    where none is); with the cost target and the clairvoyant bound."""
    lines = []
    for name, load in sorted({(r["trace"], r["load"]) for r in summary}):
        cell = [r for r in summary if (r["trace"], r["load"]) == (name, load)]
        ours = next(r for r in cell if r["sizing"] == "ours")
        entry: Row = {"trace": name, "load": load, "cost_target": COST_TARGETS[load],
                      "clairvoyant_worst": ours["clairvoyant_vs_lower_bound_worst"]}
        for sizing in ("ours", *SWEPT):
            swept = [r for r in cell if r["sizing"] == sizing]
            within = [r for r in swept if r["over_target_frac_worst"] <= OVER_TARGET_BUDGET]
            best = ours if sizing == "ours" else min(within, key=lambda r: r["cost_vs_lower_bound_worst"], default=None)
            if swept:
                entry[sizing] = None if best is None else {
                    key: best[key] for key in ("quantile", "cost_vs_lower_bound_worst", "over_target_frac_worst",
                                               "first_chunk_max_s_worst")}
        lines.append(entry)
    return lines


def print_tables(summary: list[Row], lines: list[Row], console: Console) -> None:
    table = Table(title="sizing by a forecast of the rise and by the recent rises, at each quantile, beside ours "
                        "(worst seed; mean)")
    for column in ("trace", "load", "sizing", "seeds", "x LB worst; mean", "over target worst; mean",
                   "first chunk max", "both met"):
        table.add_column(column)
    for r in summary:
        sizing = "ours" if r["quantile"] is None else f"{SWEPT[r['sizing']]} q{r['quantile']:g}"
        table.add_row(r["trace"], str(r["load"]), sizing, str(r["seeds"]),
                      f"{r['cost_vs_lower_bound_worst']:.3f}; {r['cost_vs_lower_bound_mean']:.3f}",
                      f"{r['over_target_frac_worst']:.3%}; {r['over_target_frac_mean']:.3%}",
                      f"{r['first_chunk_max_s_worst']:.1f} s", "yes" if r["meets_both"] else "")
    console.print(table)
    table = Table(title="the cheapest quantile within 0.1% on every seed: x LB, over target, first chunk max (worst "
                        "seed)")
    for column in ("trace", "load", "cost target", "ours", *(f"{label}: q, ..." for label in SWEPT.values()),
                   "clairvoyant x LB"):
        table.add_column(column)

    def shown(best: Row | None) -> str:
        if best is None:
            return "none within budget"
        quantile = "" if best["quantile"] is None else f"q{best['quantile']:g}, "
        return (f"{quantile}{best['cost_vs_lower_bound_worst']:.3f}, {best['over_target_frac_worst']:.3%}, "
                f"{best['first_chunk_max_s_worst']:.1f} s")

    for r in lines:
        table.add_row(r["trace"], str(r["load"]), f"{r['cost_target']:g}", shown(r["ours"]),
                      *(shown(r[sizing]) if sizing in r else "not run" for sizing in SWEPT),
                      f"{r['clairvoyant_worst']:.3f}")
    console.print(table)


def plot(summary: list[Row], path: Path) -> None:
    panels = []
    for name, load in sorted({(r["trace"], r["load"]) for r in summary}):
        cell = [r for r in summary if (r["trace"], r["load"]) == (name, load)]
        families: dict[str, list[tuple[str, float, float]]] = {}
        for sizing, label in SWEPT.items():  # each family drawn, if only as "not run", so it keeps its colour
            points = [(f"{r['quantile']:g}", r["over_target_frac_worst"], r["cost_vs_lower_bound_worst"])
                      for r in cell if r["sizing"] == sizing]
            families[f"{label} (quantile)" if points else f"{label}: not run"] = points
        families["ours"] = [("ours", r["over_target_frac_worst"], r["cost_vs_lower_bound_worst"])
                            for r in cell if r["sizing"] == "ours"]
        panels.append((f"{name}, load {load} ({cell[0]['seeds']} seeds)", COST_TARGETS[load], families))
    plot_frontier(panels, OVER_TARGET_BUDGET, path)


def plan(directory: Path, name: str, load: int, sizings: set[str]) -> list[Job]:
    """The cell's replays of ``sizings``; the forecast is built only when it is replayed (30 replications)."""
    seeds = range(SEEDS[name])
    jobs = [Job(name, load, seed, "ours") for seed in seeds] if "ours" in sizings else []
    if "forecast" in sizings:
        told = forecasts(directory, name, load)
        jobs += [Job(name, load, seed, "forecast", q, told[q]) for seed in seeds for q in QUANTILES]
    if "recent" in sizings and load in CANDIDATE_LOADS:
        jobs += [Job(name, load, seed, "recent", q) for seed in seeds for q in CANDIDATE_QUANTILES]
    return jobs


def replay_all(directory: Path, console: Console, sizings: set[str]) -> list[Row]:
    rows: list[Row] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    cells = [(name, load) for name in SEEDS for load in LOADS]
    with Progress(*columns, console=console) as progress, multiprocessing.Pool(2) as pool:
        task = progress.add_task("replaying", total=None)
        for name, load in cells:
            progress.update(task, description=f"{name} {load}: planning")
            jobs = plan(directory, name, load, sizings)
            progress.update(task, total=(progress.tasks[0].total or 0) + len(jobs))
            for row in pool.imap_unordered(replay, [(directory, job) for job in jobs]):
                rows.append(row)
                progress.update(task, advance=1, description=f"{name} {load}: replaying")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description="sizing by a perfect forecast of the load's statistics")
    parser.add_argument("--replot", action="store_true",
                        help="the tables, JSON and PNG again from the rows in bench/results/forecast_bound.json")
    parser.add_argument("--only", action="append", choices=SIZINGS,
                        help="replay this sizing only (repeatable) and keep the recorded rows of the others")
    args = parser.parse_args()
    out = REPO_ROOT / "bench" / "results"
    console = Console(width=150)
    recorded = json.loads((out / "forecast_bound.json").read_text())["rows"] if args.replot or args.only else []
    rows = recorded
    if not args.replot:
        sizings = set(args.only or SIZINGS)
        try:
            rows = [r for r in recorded if r["sizing"] not in sizings] + replay_all(traces_dir(REPO_ROOT), console,
                                                                                    sizings)
        except TracesMissingError as error:
            console.print(f"[red]{error}[/red]")
            return 2
        rows.sort(key=lambda r: (r["trace"], r["load"], r["seed"], r["sizing"], r["quantile"] or 0.0))
    summary = summarise(rows)
    lines = references(summary)
    print_tables(summary, lines, console)
    out.mkdir(parents=True, exist_ok=True)
    (out / "forecast_bound.json").write_text(json.dumps(
        {"quantiles": QUANTILES, "replication_seeds": [REPLICATION_SEEDS.start, REPLICATION_SEEDS.stop - 1],
         "references": lines, "summary": summary, "rows": rows}, indent=1) + "\n")
    plot(summary, out / "forecast_bound.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
