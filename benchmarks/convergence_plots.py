"""Readable figures of a convergence run, drawn from its committed files alone (no run cache).

Inputs, all written by the harness (``convergence_report.write_outputs``) next to each other:
``PREFIX.csv`` (every validation point of every run), ``PREFIX_runs.csv`` (one row per run) and
``PREFIX.meta.json`` (labels, the stock step time and each strategy's step-time ratio, the
target). Outputs:

* ``PREFIX.png``: validation loss against *modelled* wall-clock (steps executed x the stock
  step time x the strategy's measured step-time ratio + charged checkpoint time, as the
  harness models time to target), one line per strategy (the mean of its runs, a band from
  the fastest to the slowest run), one row of panels per group of at most six strategies, one
  column per failure rate. The reference and plain CheckFree are drawn in every row.
* ``PREFIX_bars.png``: modelled wall-clock to the target per strategy, one panel per rate,
  mean with the runs' standard deviation as error bars; runs stopped by an unrecoverable loss
  are counted apart and said so on the bar.

    python -m benchmarks.convergence_plots benchmarks/results/convergence   # redraws both PNGs
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import textwrap
from collections import defaultdict

REFERENCE = "no_failure"
COMPARATOR = "checkfree"      # drawn in every row, so each row reads against plain CheckFree
MAX_PER_ROW = 6               # strategies per panel, the two above included
GROUPS = (                    # (row title, which strategies belong to it)
    ("CheckFree and CheckFree+ variants", lambda n: n.startswith("checkfree")),
    ("checkpointing, every rank rolls back", lambda n: n.startswith("checkpoint_")),
    ("checkpointing, only the lost stage reloads", lambda n: n.startswith("ckpt_stage_")),
    ("redundant computation (Bamboo)", lambda n: n.startswith("redundant")),
)


def read_csv(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def load(prefix: str) -> tuple[list[dict], list[dict], dict]:
    """(curve points, runs, meta) of one convergence output prefix."""
    meta_path = prefix + ".meta.json"
    if not os.path.exists(meta_path):
        raise SystemExit(f"{meta_path} not found: the plots need the stock step time and step-time ratios it "
                         "holds (written by the harness; see benchmarks/convergence_report.py)")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    return read_csv(prefix + ".csv"), read_csv(prefix + "_runs.csv"), meta


def strategy_order(runs: list[dict]) -> list[str]:
    """Strategies in the order the harness wrote them (its registry order)."""
    seen: list[str] = []
    for r in runs:
        if r["strategy"] not in seen:
            seen.append(r["strategy"])
    return seen


def rows_of(names: list[str]) -> list[tuple[str, list[str]]]:
    """Rows of at most MAX_PER_ROW strategies: the reference and plain CheckFree, then one group's
    members (a group too large is split over rows; strategies no group claims form a last row)."""
    fixed = [n for n in (REFERENCE, COMPARATOR) if n in names]
    room, rows, claimed = MAX_PER_ROW - len(fixed), [], set(fixed)
    for title, member in (*GROUPS, ("other strategies", lambda n: True)):
        own = [n for n in names if member(n) and n not in claimed]
        claimed.update(own)
        chunks = [own[i:i + room] for i in range(0, len(own), room)]
        for k, chunk in enumerate(chunks):
            rows.append((title + (f" ({k + 1}/{len(chunks)})" if len(chunks) > 1 else ""), fixed + chunk))
    return rows or [("all strategies", fixed)]


def modelled_x(point: dict, meta: dict) -> float:
    """A validation point's modelled wall-clock: steps executed x stock step x ratio + charged."""
    ratio = meta["modelled_wall"]["strategies"][point["strategy"]]["ratio"][0]
    return (float(point["steps_executed"]) * meta["modelled_wall"]["stock_step_s"] * ratio
            + float(point["charged_s"]))


def curves(points: list[dict], meta: dict) -> dict[tuple[str, float], list[list[tuple[float, float]]]]:
    """(strategy, rate) -> one [(modelled s, val loss), ...] list per run."""
    by_run: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for p in points:
        key = (p["strategy"], float(p["rate"]), p["failure_seed"], p["train_seed"])
        by_run[key].append((modelled_x(p, meta), float(p["val_loss"])))
    out: dict[tuple[str, float], list] = defaultdict(list)
    for (name, rate, _, _), pts in sorted(by_run.items()):
        out[(name, rate)].append(sorted(pts))
    return out


def mean_band(runs: list[list[tuple[float, float]]], n_grid: int = 240):
    """On a common time grid: (x, mean, low, high) over the runs still going at each x; the mean
    stops where fewer than half the runs are left (runs end when they reach the target)."""
    import numpy as np
    end = max(r[-1][0] for r in runs)
    xs = np.linspace(min(r[0][0] for r in runs), end, n_grid)
    ys = np.full((len(runs), n_grid), np.nan)
    for i, r in enumerate(runs):
        rx, ry = np.array([p[0] for p in r]), np.array([p[1] for p in r])
        inside = (xs >= rx[0]) & (xs <= rx[-1])
        ys[i, inside] = np.interp(xs[inside], rx, ry)
    alive = np.sum(~np.isnan(ys), axis=0)
    keep = alive >= max(1, math.ceil(len(runs) / 2))
    with np.errstate(all="ignore"):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, low, high = np.nanmean(ys, 0), np.nanmin(ys, 0), np.nanmax(ys, 0)
    return xs[keep], mean[keep], low[keep], high[keep]


def cell_stats(runs: list[dict]) -> dict[tuple[str, float], dict]:
    """(strategy, rate) -> modelled wall-clock to target over the runs that reached it, and counts."""
    cells: dict[tuple[str, float], dict] = {}
    for r in runs:
        c = cells.setdefault((r["strategy"], float(r["rate"])), {"reached": [], "stopped": 0, "cut": 0, "n": 0})
        c["n"] += 1
        if r["reached"] == "True":
            c["reached"].append(float(r["modelled_wall_to_target_s"]))
        elif r["state"] == "stopped":
            c["stopped"] += 1
        else:
            c["cut"] += 1
    for c in cells.values():
        v = c["reached"]
        c["mean"] = statistics.fmean(v) if v else None
        c["sd"] = statistics.stdev(v) if len(v) > 1 else 0.0
    return cells


def rates_of(runs: list[dict]) -> list[float]:
    rates = sorted({float(r["rate"]) for r in runs if r["strategy"] != REFERENCE} or {0.0})
    return rates


def _colors(names: list[str]) -> dict[str, str]:
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#e377c2"]
    out = {REFERENCE: "#7f7f7f", COMPARATOR: "#000000"}
    k = 0
    for n in names:
        if n not in out:
            out[n] = palette[k % len(palette)]
            k += 1
    return out


def draw_curves(prefix: str, points: list[dict], runs: list[dict], meta: dict) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names, rates = strategy_order(runs), rates_of(runs)
    labels = {n: meta["modelled_wall"]["strategies"][n]["label"] for n in names}
    rows, cv, cells = rows_of(names), curves(points, meta), cell_stats(runs)
    target = meta["target_val_loss"]
    x_max = 1.15 * max(c["mean"] for c in cells.values() if c["mean"] is not None)
    panel_w = 4.2 if len(rates) > 2 else 6.0
    fig, axes = plt.subplots(len(rows), len(rates), figsize=(panel_w * len(rates) + 5.0, 3.3 * len(rows)),
                             squeeze=False, sharex=True, sharey=True)
    for i, (title, members) in enumerate(rows):
        colors = _colors(members)
        for j, rate in enumerate(rates):
            ax = axes[i][j]
            for n in members:
                key = (n, 0.0 if n == REFERENCE else rate)
                if key not in cv:
                    continue
                x, m, lo, hi = mean_band(cv[key])
                style = dict(color=colors[n], lw=2.0 if n in (REFERENCE, COMPARATOR) else 1.6,
                             ls="--" if n == REFERENCE else "-")
                ax.fill_between(x, lo, hi, color=colors[n], alpha=0.12, lw=0)
                n_runs = len(cv[key])
                ax.plot(x, m, label=f"{labels[n]} ({n_runs} run{'s' if n_runs > 1 else ''})"
                        if j == len(rates) - 1 else None,
                        **style)
                c = cells.get(key)
                if c and c["mean"] is not None:
                    ax.plot([c["mean"]], [target], "o", color=colors[n], ms=6, mec="white", mew=0.8)
            ax.axhline(target, color="#555555", ls=":", lw=1)
            ax.set_ylim(target - 0.12, target + 0.9)  # the approach to the target, where strategies differ
            ax.set_xlim(0, x_max)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(f"{rate:g} % per stage per hour", fontsize=12)
            if i == len(rows) - 1:
                ax.set_xlabel("modelled wall-clock (s)", fontsize=11)
            if j == 0:
                ax.set_ylabel(f"{title}\n\nvalidation loss", fontsize=10)
            ax.tick_params(labelsize=10)
        axes[i][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=9, frameon=False)
    title = (f"Validation loss against modelled wall-clock: mean of each strategy's runs (line), fastest to "
             f"slowest run (band); dotted: target {target:.4f}; dot: mean time to target")
    fig.suptitle(textwrap.fill(title, int(fig.get_figwidth() * 11)), fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out = prefix + ".png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def draw_bars(prefix: str, runs: list[dict], meta: dict) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names, rates = strategy_order(runs), rates_of(runs)
    labels = {n: meta["modelled_wall"]["strategies"][n]["label"] for n in names}
    cells = cell_stats(runs)
    group_color = {}
    for n in names:
        k = next((i for i, (_, member) in enumerate(GROUPS) if member(n)), len(GROUPS))
        group_color[n] = "#7f7f7f" if n == REFERENCE else ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"][k]
    fig, axes = plt.subplots(1, len(rates), figsize=(max(4.0 * len(rates), 6.0) + 3.4, 0.42 * len(names) + 1.6),
                             squeeze=False, sharey=True, sharex=True)
    x_max = 1.3 * max(c["mean"] + c["sd"] for c in cells.values() if c["mean"] is not None)
    ys = list(range(len(names)))[::-1]
    for j, rate in enumerate(rates):
        ax = axes[0][j]
        here = {n: cells.get((n, 0.0 if n == REFERENCE else rate)) for n in names}
        complete = [n for n, c in here.items() if c and c["mean"] is not None and n != REFERENCE and
                    not c["stopped"] and not c["cut"]]
        fastest = min(complete, key=lambda n: here[n]["mean"], default=None)  # the first of a tie, as the .md
        for y, n in zip(ys, names):
            c = here[n]
            if not c:
                continue
            if c["mean"] is None:
                ax.text(0.5, y, f"all {c['n']} runs stopped (unrecoverable)", va="center", fontsize=8.5,
                        transform=ax.get_yaxis_transform(), ha="center", color="#b22222")
                continue
            partial = c["stopped"] or c["cut"]
            ax.barh(y, c["mean"], xerr=c["sd"], color=group_color[n], alpha=0.45 if partial else 0.85,
                    hatch="//" if partial else None, edgecolor="black", lw=0.5, capsize=3)
            note = ""
            if partial:
                note = f"  {len(c['reached'])}/{c['n']} reached; {c['stopped']} stopped" + \
                       (f", {c['cut']} cut off" if c["cut"] else "")
            elif n == fastest:
                note = "  fastest"
            ax.text(c["mean"] + c["sd"], y, note, va="center", fontsize=8.5)
        ref = here.get(REFERENCE)
        if ref and ref["mean"] is not None:
            ax.axvline(ref["mean"], color="#7f7f7f", ls="--", lw=1)
        ax.set_title(f"{rate:g} % per stage per hour", fontsize=11)
        ax.set_xlim(0, x_max)
        ax.set_xlabel("modelled wall-clock to target (s)", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=9.5)
    axes[0][0].set_yticks(ys)
    axes[0][0].set_yticklabels([labels[n] for n in names], fontsize=9.5)
    title = ("Modelled wall-clock to the target: mean ± sd over the runs that reached it (dashed: the "
             "no-failure reference; hatched: some runs stopped on an unrecoverable loss)")
    fig.suptitle(textwrap.fill(title, int(fig.get_figwidth() * 12)), fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.93 if len(rates) > 2 else 0.88))
    out = prefix + "_bars.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def draw(prefix: str) -> list[str]:
    """Both figures of one output prefix; returns the paths written."""
    points, runs, meta = load(prefix)
    if not points or not any(r["reached"] == "True" for r in runs):
        return []  # a partial report with no finished run: nothing to draw yet
    return [draw_curves(prefix, points, runs, meta), draw_bars(prefix, runs, meta)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefixes", nargs="+", help="output prefixes, e.g. benchmarks/results/convergence")
    for prefix in p.parse_args(argv).prefixes:
        for path in draw(prefix):
            print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
