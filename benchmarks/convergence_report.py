"""The convergence harness's outputs: every validation point of every run (CSV: the curves, kept
so any figure can be redrawn on a fresh clone), one row per run (CSV), what the figures and the
docs need to read them (meta JSON: commit, date, machine, protocol, the modelled-time inputs),
the figures (``convergence_plots``) and the tables with the protocol (markdown)."""
from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import subprocess
import time

from benchmarks._runs import RESULTS
from benchmarks.convergence_plots import draw
from benchmarks.convergence_projection import projection_section
from benchmarks.convergence_stats import (charged_at_target, fmt_summary, gap_vs, modelled_wall, run_outcomes,
                                          summarize_outcomes)
from benchmarks.convergence_strategies import NO_FAILURE


def write_outputs(a, strategies, unavailable, rates, runs, target, ref_targets, schedules, probs, prefix,
                  elapsed_s, ratios, missing=()):
    """``runs``: (strategy name, rate, failure seed, train seed) -> dict(points, costs, status, step_s);
    writes ``prefix``.csv, _runs.csv, .png and .md and returns the markdown. ``missing``: runs
    that ``--report_only`` did not find in the cache (named in the markdown: a partial report)."""
    by_name = {st.name: st for st in strategies}
    # the stock step time: every run's median step time divided by its strategy's ratio, median over runs
    per_run = [runs[k]["step_s"] / ratios.get(by_name[k[0]].step_variant, (1.0,))[0] for k in runs
               if runs[k].get("step_s")]
    t_ref = statistics.median(per_run) if per_run else float("nan")

    def ratio_rel_se(name):  # the step-time ratio's 95% CI as a relative standard error
        r, lo, hi = ratios.get(by_name[name].step_variant, (1.0, 1.0, 1.0))
        return (hi - lo) / 3.92 / r
    with open(prefix + ".csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["strategy", "rate", "failure_seed", "train_seed", "step", "steps_executed", "wall", "val_loss",
                    "measured_s", "charged_s"])
        for (name, rate, fs, ts), run in runs.items():
            for p in run["points"]:
                w.writerow([name, rate, fs, ts, p.step, p.steps_executed, round(p.wall_s, 4), round(p.val_loss, 5),
                            round(p.measured_s, 4), round(p.charged_s, 4)])
    outcomes = {}
    with open(prefix + "_runs.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["strategy", "rate", "failure_seed", "train_seed", "state", "failures", "recoveries",
                    "rollbacks", "steps_executed", "steps_redone", "steps_to_target", "reached", "wall_to_target_s",
                    "modelled_wall_to_target_s", "median_step_s"])
        for key, run in runs.items():
            so, wo = run_outcomes(run["points"], run["costs"], target)
            ratio = ratios.get(by_name[key[0]].step_variant, (1.0,))[0]
            mo = modelled_wall(so, t_ref, ratio, charged_at_target(run["points"], target))
            outcomes[key] = (so, wo, run["costs"].failures, mo)
            c = run["costs"]
            w.writerow([*key, run["status"]["state"], c.failures, c.recoveries, c.checkpoint_loads,
                        c.steps_executed, c.steps_redone, round(so.value, 2), so.reached, round(wo.value, 3),
                        round(mo.value, 3), run.get("step_s")])

    def cell(name, rate):
        ks = [k for k in outcomes if k[0] == name and k[1] == rate]
        return ([outcomes[k][0] for k in ks], [outcomes[k][1] for k in ks], [outcomes[k][2] for k in ks], ks,
                [outcomes[k][3] for k in ks])

    write_meta(prefix, a, strategies, runs, target, t_ref, ratios)
    draw(prefix)  # the curves (PREFIX.png) and the bars (PREFIX_bars.png), from the files just written

    L = [f"# Convergence under failures ({'quick' if a.quick else 'full'} run)", "",
         f"Model `{a.model}`" + (f" with {a.num_layers} decoder layers" if a.num_layers else "")
         + f"; reference {a.steps} steps; validation every {a.eval_every} steps ({a.eval_batches} batches); "
         f"training seeds {a.train_seeds}; failure schedules (seeds) {a.failure_seeds}; "
         f"cap {a.cap_factor:g}x the reference = {a.cap_steps} logical steps. Harness wall time "
         f"{elapsed_s / 60:.1f} min this invocation; the runs' own launches took "
         f"{sum(v['status'].get('launch_s', 0) for v in runs.values()) / 60:.1f} min (finished runs are reused); "
         "this machine: 2 shared CPU cores, no GPU.", "",
         f"Command: `python -m benchmarks.convergence {' '.join(a.argv)}`; outputs written "
         f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
         + (f"; runs started {min(v['started'] for v in runs.values() if v.get('started'))} to "
            f"{max(v['started'] for v in runs.values() if v.get('started'))}, 1-min load at their starts "
            f"{min(v['load'] for v in runs.values() if v.get('load') is not None):.1f}-"
            f"{max(v['load'] for v in runs.values() if v.get('load') is not None):.1f}"
            if any(v.get("started") for v in runs.values()) else "") + ".", "",
         f"**Target validation loss {target:.4f}**: "
         + ("given by --target_loss" if a.target_loss is not None else
            f"the highest of the references' validation losses at {int(a.target_fraction * 100)}% of their steps "
            f"({', '.join(f'seed {s}: {v:.4f}' for s, v in ref_targets.items())})") + ".", "",
         "**Protocol**", "",
         f"- failures: per-stage rate -> per-step probability at an assumed {a.assumed_step_seconds:g} s/step "
         "(time compression: measured steps take ~0.1-0.3 s): "
         + ", ".join(f"{r:g}%/h -> p={probs[r]:.4f}" for r in rates)
         + "; one schedule per (failure seed, stage count), replayed for every strategy with that stage count "
           "(6-stage strategies draw over 6 stages: more failures per step); "
         + ("a failure fires once (not again on a redone step)" if a.failure_draws == "logical_step" else
            "draws on every executed step (redone steps too), seeded per schedule"),
         "- every run stops at the target or at the cap; '>N': never reached, N steps executed (or N s used) "
         "at the cut-off; '≥mean (k/n reached)': some runs cut off, counted at their cut-off (a lower bound)",
         "- 'unrecoverable': a run stopped because its strategy cannot recover the loss (CheckFree cannot rebuild "
         "two adjacent stages lost at the same step, which the paper assumes away; strategies without a fallback "
         "checkpoint then stop): counted as cut off where it stopped, and the runs that recovered are summarised "
         "apart",
         "- steps = optimizer steps executed to the target (redone steps after a rollback included), interpolated "
         "between validations",
         "- measured wall-clock = measured - validation passes + checkpoint bytes at "
         f"{a.storage_bandwidth_mb_s:g} MB/s "
         f"+ {a.replacement_delay_s:g} s per lost stage; runs execute one after another on a shared machine, so "
         "it carries load noise (other engineers' jobs ran beside these); steps do not",
         f"- modelled wall-clock = steps to target x {t_ref:.4f} s (stock step time: median over runs of each run's "
         "median step time / its strategy's ratio) x the "
         f"strategy's step-time ratio vs stock from `{os.path.relpath(a.step_time_csv, os.path.dirname(RESULTS))}` "
         "(interleaved rounds, 4 stages, 8 layers; CheckFree+ at 6 stages uses the 4-stage ratio) + the charged "
         "costs up to the target; its gap's band adds both ratios' CI (as standard errors) to the run-to-run "
         "spread; ratios: "
         + ", ".join(f"{k} {v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for k, v in ratios.items()),
         f"- noise: mean ± sd over {len(a.failure_seeds)} schedules x {len(a.train_seeds)} seeds; a gap to the "
         "fastest strategy of the rate is 'inside the noise' when |gap| <= 2 Welch standard errors "
         "(a rough 95% band at these n; gaps to censored cells are not measured gaps)",
         "- checkpoint baselines: 'global rollback' = every rank reloads the last checkpoint (DeepSpeed users' "
         "practice); plain CheckFree (all stages fail) rolls back to its fallback checkpoint on an edge-stage loss",
         "- redundant: Bamboo = the successor's forward run redundantly on every micro-batch (real compute, "
         "measured in the step time); lower bound = gradient shipping only", ""]
    if missing:
        L += [f"**Partial report (--report_only)**: {len(missing)} runs are not in the cache yet and are left out "
              "of every number below: " + ", ".join(f"{n} rate {r:g} schedule {f} seed {t}" for n, r, f, t in missing),
              ""]
    if unavailable:
        L += ["**Not available in this checkout** (their config keys have not landed): "
              + "; ".join(f"`{s.name}` ({s.label}; needs checkfree.{', '.join(s.requires)})" for s in unavailable),
              ""]
    summary_at, across = len(L), {}  # the summary across rates goes here, once every rate is done
    for rate in rates:
        sched = schedules.get(rate, {})
        L += [f"## {rate:g} % per stage per hour (p = {probs[rate]:.4f} per stage per step)", ""]
        for (S, never, fs), fl in sorted(sched.items()):
            L.append(f"- schedule {fs}, {S} stages{f' (stages {list(never)} never fail)' if never else ''}: "
                     + (", ".join(f"{s}:{g}" for s, g in fl) or "none") + " (step:stage)")
        L += ["", "| strategy | runs | failures (mean) | steps redone (mean) | steps to target | measured wall s "
              "| modelled wall s | modelled-wall gap to fastest (± 2 SE) | steps gap to fewest (± 2 SE) |",
              "|---|---|---|---|---|---|---|---|---|"]
        cells = {}
        for st in strategies:
            r = 0.0 if st.name == NO_FAILURE else rate
            so, wo, fl, ks, mo = cell(st.name, r)
            if ks:
                cells[st.name] = (summarize_outcomes(so), summarize_outcomes(mo), fl, ks, summarize_outcomes(wo))
        rivals = [n for n in cells if n != NO_FAILURE]
        fastest = min((n for n in rivals if not cells[n][1].censored), key=lambda n: cells[n][1].mean, default=None)
        fewest = min((n for n in rivals if not cells[n][0].censored), key=lambda n: cells[n][0].mean, default=None)
        for st in strategies:
            if st.name not in cells:
                continue
            ss, ms, fl, ks, ws = cells[st.name]
            redone = statistics.fmean(runs[k]["costs"].steps_redone for k in ks)

            def gap(which, best):
                if st.name == best:
                    return "(fastest)" if which == 1 else "(fewest)"
                sys_a = sys_b = 0.0
                if which == 1 and best and cells[st.name][1] is not None and cells[best][1] is not None:
                    sys_a = cells[st.name][1].mean * ratio_rel_se(st.name)
                    sys_b = cells[best][1].mean * ratio_rel_se(best)
                g = gap_vs(cells[st.name][which], cells[best][which], sys_a=sys_a, sys_b=sys_b) if best else None
                if st.name == NO_FAILURE:
                    return "-"
                if g is None:
                    return "n/a (censored or n<2)"
                return f"{g[0]:+.{1 if which == 1 else 0}f} ± {g[1]:.{1 if which == 1 else 0}f} " \
                       f"({'inside the noise' if g[2] else 'outside the noise'})"
            steps_txt = fmt_summary(ss)
            # a run that stopped (unrecoverable loss) is not a slow run: the ones that recovered, apart
            going_on = [outcomes[k][0] for k in ks if runs[k]["status"]["state"] != "stopped"]
            if going_on and len(going_on) < len(ks):
                steps_txt += (f"; {len(ks) - len(going_on)} unrecoverable, the {len(going_on)} that recovered: "
                              f"{fmt_summary(summarize_outcomes(going_on))}")
            elif not going_on:
                steps_txt += f"; all {len(ks)} unrecoverable"
            wall_gap = gap(1, fastest)
            mark = ("fastest" if wall_gap == "(fastest)" else "within the noise of the fastest"
                    if wall_gap.endswith("(inside the noise)") else "slower" if wall_gap.endswith("(outside the noise)")
                    else "")
            unrecoverable = len(ks) - len(going_on)
            across.setdefault(st.label, {})[rate] = f"{fmt_summary(ss)} / {fmt_summary(ms, 1)}" \
                + (f" ({mark})" if mark and st.name != NO_FAILURE else "") \
                + (f" [{unrecoverable} unrecoverable]" if unrecoverable else "")
            L.append(f"| {st.label} | {len(ks)} | {statistics.fmean(fl):.1f} | {redone:.1f} | {steps_txt} | "
                     f"{fmt_summary(ws, 1)} | {fmt_summary(ms, 1)} | {wall_gap} | {gap(0, fewest)} |")
        stopped = [(k, runs[k]["status"]) for k in runs if k[1] == rate and runs[k]["status"]["state"] == "stopped"]
        for k, s in stopped:
            L.append(f"\n- {k[0]} (schedule {k[2]}, seed {k[3]}) stopped: {s.get('reason', '')}")
        L.append("")

    L[summary_at:summary_at] = summary_across_rates(rates, across)
    L += projection_section(a, strategies, outcomes, ratios)
    text = "\n".join(L)
    with open(prefix + ".md", "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return text



def summary_across_rates(rates, across: dict[str, dict[float, str]]) -> list[str]:
    """One row per strategy, one column per rate: steps to target / modelled wall-clock, and
    where the latter stands against the rate's fastest (the per-rate tables have the numbers)."""
    L = ["## Summary across rates", "",
         "Each cell: steps to target (mean ± sd) / modelled wall s (mean ± sd), and the modelled wall-clock against "
         "the fastest strategy of that rate (2 Welch SE band; details and gaps in the per-rate tables below).", "",
         "| strategy | " + " | ".join(f"{r:g} %/h" for r in rates) + " |", "|---|" + "---|" * len(rates)]
    for label, by_rate in across.items():
        L.append(f"| {label} | " + " | ".join(by_rate.get(r, "-") for r in rates) + " |")
    return L + [""]


def _git_commit() -> str:
    """HEAD of the checkout the harness runs from, with "+changes" when its tree differs."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + (" +changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def _machine(accelerator: str) -> str:
    import torch
    import deepspeed
    gpu = torch.cuda.get_device_name(0) if accelerator == "cuda" and torch.cuda.is_available() else "no GPU used"
    return (f"{platform.node()}: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), {gpu}; "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, "
            f"DeepSpeed {deepspeed.__version__}")


def write_meta(prefix, a, strategies, runs, target, t_ref, ratios) -> None:
    """``PREFIX.meta.json``: the commit, date, machine and protocol of these outputs, and what the
    figures need besides the two CSVs (labels, the stock step time, every strategy's ratio)."""
    started = [v["started"] for v in runs.values() if v.get("started")]
    meta = {
        "benchmark": f"convergence under failures ({'quick' if a.quick else 'full'} protocol)",
        "files": [os.path.basename(prefix) + ext for ext in (".csv", "_runs.csv", ".md", ".png", "_bars.png")],
        "command": f"python -m benchmarks.convergence {' '.join(a.argv)}".strip(),
        "protocol": (f"model {a.model}" + (f" with {a.num_layers} decoder layers" if a.num_layers else "")
                     + f"; reference {a.steps} steps; rates {a.rates} % per stage per hour at an assumed "
                     f"{a.assumed_step_seconds:g} s per step; failure schedules {a.failure_seeds} x training seeds "
                     f"{a.train_seeds}; failure draws {a.failure_draws}; cap {a.cap_steps} steps; checkpoint "
                     f"bytes charged at {a.storage_bandwidth_mb_s:g} MB/s; the .md states the rest"),
        "date": (f"runs {min(started)} to {max(started)}; " if started else "")
        + f"outputs {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
        "code_commit": _git_commit() + " (reused runs may come from earlier commits: a run is reused when its "
                                       "spec matches)",
        "machine": _machine(a.accelerator),
        "target_val_loss": round(target, 4),
        "modelled_wall": {
            "stock_step_s": t_ref, "storage_bandwidth_mb_s": a.storage_bandwidth_mb_s,
            "step_ratio_source": os.path.basename(a.step_time_csv),
            "strategies": {st.name: {"label": st.label, "step_variant": st.step_variant,
                                     "ratio": list(ratios.get(st.step_variant, (1.0, 1.0, 1.0)))}
                           for st in strategies if any(k[0] == st.name for k in runs)},
        },
    }
    with open(prefix + ".meta.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
        f.write("\n")
