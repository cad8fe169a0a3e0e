"""PNG pictures of simulated runs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)

from services.scheduler.sim.results import SimResult  # noqa: E402


def plot_timelines(results: Sequence[SimResult], title: str, path: Path) -> Path:
    """Active sessions and GPU count over time per policy (top), worst chunk latency per sample (bottom)."""
    figure, (load_axis, latency_axis) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    if results:
        first = results[0].series
        load_axis.plot([t / 3600 for t in first.time_s], first.active, color="black", lw=1, label="active sessions")
    for result in results:
        hours = [t / 3600 for t in result.series.time_s]
        capacity = [g * 4 for g in result.series.gpus]
        load_axis.step(hours, capacity, where="post", lw=1, label=f"{result.policy}: GPU slots (4 x GPUs)")
        latency_axis.plot(hours, [max(w, 1.0) for w in result.series.worst_ms], lw=0.8, label=result.policy)
    latency_axis.axhline(400, color="red", ls="--", lw=0.8, label="target 400 ms")
    latency_axis.set_yscale("log")
    latency_axis.set_ylabel("worst chunk latency per sample (ms)")
    latency_axis.set_xlabel("hours into the window")
    load_axis.set_ylabel("sessions / slots")
    load_axis.set_title(title)
    load_axis.legend(fontsize=7, loc="upper left")
    latency_axis.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_cost_vs_latency(
    points: Sequence[tuple[str, float, float, float]],
    sweep: Sequence[tuple[float, float, float]],
    title: str,
    path: Path,
) -> Path:
    """Left: GPU-hours against worst-case latency for every policy. Right: the paper's rule swept over rho
    (cost against fraction of chunks over target) with ours marked. ``points``: (policy, gpu_hours, worst_ms,
    over_frac); ``sweep``: (rho, gpu_hours, over_frac)."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for policy, gpu_hours, worst_ms, _ in points:
        left.scatter(gpu_hours, worst_ms, s=30)
        left.annotate(policy, (gpu_hours, worst_ms), fontsize=7)
    left.set_yscale("log")
    left.set_xlabel("GPU-hours")
    left.set_ylabel("worst-case chunk latency (ms)")
    left.set_title("cost vs worst-case latency")
    if sweep:
        right.plot([s[1] for s in sweep], [max(s[2], 1e-7) for s in sweep], "o-", label="paper's rule, rho sweep")
        for rho, gpu_hours, over in sweep:
            right.annotate(f"{rho:g}", (gpu_hours, max(over, 1e-7)), fontsize=7)
    for policy, gpu_hours, _, over in points:
        if policy.startswith("ours"):
            right.scatter([gpu_hours], [max(over, 1e-7)], marker="*", s=120, label=policy)
    right.axhline(1e-3, color="red", ls="--", lw=0.8, label="0.1% budget")
    right.set_yscale("log")
    right.set_xlabel("GPU-hours")
    right.set_ylabel("fraction of chunks over target (1e-7 = none)")
    right.set_title("cost vs violations")
    right.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


FrontierPoint = tuple[str, float, float]  # (setting, worst share over target, worst cost x lower bound)


def plot_frontier(panels: Sequence[tuple[str, float, dict[str, Sequence[FrontierPoint]]]], budget: float,
                  path: Path) -> Path:
    """One panel per trace and load: each family's settings at their worst seed (share over target, cost against
    the lower bound), joined in setting order, with the box both targets ask for shaded. A point inside the box
    meets both on every seed; ``panels``: (title, cost bound, {family: points})."""
    columns = max(1, (len(panels) + 1) // 2)
    figure, axes = plt.subplots(2, columns, figsize=(6 * columns, 9), squeeze=False)
    for axis, (title, bound, families) in zip(axes.flat, panels, strict=False):
        for family, points in families.items():
            axis.plot([max(p[1], 1e-5) for p in points], [p[2] for p in points], "o-", label=family)
            for setting, over, cost in points:
                axis.annotate(setting, (max(over, 1e-5), cost), fontsize=7)
        axis.fill_between([1e-5, budget], 1.0, bound, color="green", alpha=0.12, label="both targets met")
        axis.axvline(budget, color="red", ls="--", lw=0.8)
        axis.axhline(bound, color="red", ls="--", lw=0.8)
        axis.set_xscale("log")
        axis.set_xlabel("share of chunks over target, worst seed")
        axis.set_ylabel("GPU-hours / lower bound, worst seed")
        axis.set_title(title)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_cost_split(split: Sequence[Mapping[str, Any]], uses: Sequence[str], path: Path) -> Path:
    """One panel per trace and load: each policy's GPU-hours stacked by use, in lower bounds, with the need no
    ready GPU met hatched below zero and the clairvoyant pool's cost marked; ``split``: rows with
    trace, load, policy, one value per use, ``unmet`` and ``clairvoyant_vs_lower_bound``."""
    cells = sorted({(str(r["trace"]), int(r["load"])) for r in split}, key=lambda c: (c[0], c[1]))
    columns = max(1, (len(cells) + 1) // 2)
    figure, axes = plt.subplots(2, columns, figsize=(5 * columns, 8), squeeze=False)
    colours = plt.get_cmap("tab10")
    for axis, (name, load) in zip(axes.flat, cells, strict=False):
        rows = [r for r in split if r["trace"] == name and r["load"] == load]
        labels = [str(r["policy"]) for r in rows]
        bottom = [0.0] * len(rows)
        for index, use in enumerate(uses):
            heights = [float(r[use]) for r in rows]
            bars = axis.bar(labels, heights, bottom=bottom, color=colours(index), label=use)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        axis.bar_label(bars, labels=[f"{total:.2f}" for total in bottom], fontsize=7)
        axis.bar(labels, [-float(r["unmet"]) for r in rows], fill=False, hatch="//", edgecolor="black",
                 label="need no ready GPU met (waits, overflow)")
        axis.set_ylim(-1.2 * max(float(r["unmet"]) for r in rows) - 0.02, 1.08 * max(bottom))
        axis.scatter(labels, [float(r["clairvoyant_vs_lower_bound"]) for r in rows], marker="_", s=600,
                     color="black", label="clairvoyant, no waits", zorder=3)
        axis.axhline(1.0, color="black", lw=0.8, ls=":")
        axis.axhline(0.0, color="black", lw=0.8)
        axis.set_ylabel("GPU-hours / lower bound, mean over seeds")
        axis.set_title(f"{name}, load {load}")
        axis.tick_params(axis="x", labelsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    for axis in list(axes.flat)[len(cells):]:
        axis.set_visible(False)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
