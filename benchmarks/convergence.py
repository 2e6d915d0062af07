"""Convergence under failures: CheckFree / CheckFree+ against checkpointing and redundant computation.

For each per-stage failure rate (``--rates``, percent per stage per hour) one seeded failure
schedule is generated once (``FailurePlan(...).save``) and replayed, via
``checkfree.failure_schedule``, for every strategy (``--strategies``):

  no_failure      the reference: mode "off", no failures, no checkpoints (run once, drawn in every panel)
  checkfree       CheckFree (intermediate stages rebuilt from their neighbours). Plain CheckFree has
                  no rule for the first/last stage: when the schedule hits them it rolls back to a
                  fallback checkpoint saved every ``--checkfree_fallback_every`` steps (0: no
                  fallback, and the run stops at the first edge failure)
  checkfree_plus  CheckFree+ (edge stages too, via the swapped order and (de)embedding replicas); no
                  checkpoints; a loss it cannot rebuild (a swap pair or two adjacent stages at once)
                  stops the run, reported as such
  checkpoint      mode "off", DeepSpeed checkpoint every N steps (one strategy per
                  ``--checkpoint_every`` value); any loss rolls every rank back to the last checkpoint
  redundant       Bamboo-style redundant computation (``ds_checkfree.baselines.redundant``): exact
                  restore from the predecessor's shadow; its per-step overhead is measured in the run

Wall-clock = measured time (every step, redone steps after a rollback, checkpoint saves and
loads on the local disk, recoveries, the redundant baseline's extra work) minus validation
passes (measured and subtracted: not part of training) plus charged costs, all stated in the
outputs: checkpoint bytes written and read at ``--storage_bandwidth_mb_s`` (on top of the
measured local save/load), and ``--replacement_delay_s`` per lost stage (time to bring up a
replacement node; the same for every strategy).

Noise: on a shared 2-core machine the tiny model's wall-clock differences are a few tenths of a
second, the same order as load swings between runs; compare strategies within one rate and
repeat before trusting a small gap (the steps-to-target column is noise-free).

Time compression: a tiny model's step takes ~0.1 s here, but failures are drawn as if a step
took ``--assumed_step_seconds`` (p = 1 - (1 - rate)^(T/3600) per stage per step), so that a
short run sees the number of failures a long run would. Charged costs are in measured seconds.

    python benchmarks/convergence.py --quick   # tiny, 100 steps, rates 0/5/10/16, failures drawn at an assumed
                                               # 900 s/step, checkpoints every 5/20: 21 runs, ~8 min on 2 cores
    python benchmarks/convergence.py           # tiny, 400 steps, rates 0/5/10/16, 300 s/step, checkpoints every
                                               # 10/25/50: 25 runs, ~30 min on 2 cores (~1 min per run)

Outputs (``--out`` prefix, default ``benchmarks/results/convergence`` or ``..._quick``): ``.csv``
(every validation point of every run), ``.png`` (val loss vs wall-clock, one panel per rate,
one line per strategy) and ``.md`` (steps and wall-clock to ``--target_loss`` and speed-ups).
Finished runs are kept in ``--runs_dir`` and reused when their spec matches (``--rerun`` redoes them).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _runs import RESULTS, RunFailed, base_config, read_metrics, run_train  # noqa: E402

from ds_checkfree.failures import FailurePlan, step_failure_probability  # noqa: E402

NO_FAILURE = "no_failure"
STRATEGY_KINDS = ("no_failure", "checkfree", "checkfree_plus", "checkpoint", "redundant")
NUM_STAGES = 4


# ============================================================================ pure bookkeeping
@dataclass
class Point:
    """One validation of one run."""
    step: int             # logical step (repeats after a rollback)
    steps_executed: int   # optimizer steps actually run so far, redone steps included
    wall_s: float         # measured + charged
    val_loss: float
    measured_s: float
    charged_s: float


@dataclass
class Costs:
    """Where a run's wall-clock went (seconds)."""
    measured_s: float = 0.0
    eval_excluded_s: float = 0.0
    charged_storage_s: float = 0.0
    charged_replacement_s: float = 0.0
    checkpoint_saves: int = 0
    checkpoint_loads: int = 0
    checkpoint_bytes_written: int = 0
    checkpoint_bytes_read: int = 0
    failures: int = 0
    recoveries: int = 0
    steps_executed: int = 0
    steps_redone: int = 0
    unrecoverable: str | None = None


def _is_step(r: dict) -> bool:
    return "event" not in r and "loss" in r


def _is_val(r: dict) -> bool:
    return "event" not in r and "val_loss" in r


def wall_clock_curve(records: list[dict], storage_bandwidth_mb_s: float | None = None,
                     replacement_delay_s: float = 0.0) -> tuple[list[Point], Costs]:
    """Validation loss against steps and wall-clock for one run's metrics records (file order).

    Measured time runs from the start of the first timed record (a step or the step-0
    checkpoint save). A validation pass's own duration (its time since the record before it)
    is excluded. Charged: ``bytes / (bandwidth * 1e6)`` for each checkpoint save and for each
    load (the bytes of the checkpoint it resumed from), and ``replacement_delay_s`` per lost
    stage. ``bandwidth None`` charges no storage time.
    """
    timed = [r for r in records if "time" in r]
    if not timed:
        return [], Costs()

    def began(r):
        if _is_step(r):
            return r["time"] - r.get("step_time_s", 0.0)
        if r.get("event") in ("checkpoint_save", "checkpoint_load"):
            return r["time"] - r.get("seconds", 0.0)
        return r["time"]

    start = min(began(r) for r in timed)
    costs = Costs()
    saved: dict[int, int] = {}
    seen_steps: set[int] = set()
    points: list[Point] = []
    prev = start
    per_mb = (1.0 / (storage_bandwidth_mb_s * 1e6)) if storage_bandwidth_mb_s else 0.0
    for r in timed:
        ev = r.get("event")
        if _is_step(r):
            costs.steps_executed += 1
            if r["step"] in seen_steps:
                costs.steps_redone += 1
            seen_steps.add(r["step"])
        elif _is_val(r):
            costs.eval_excluded_s += max(0.0, r["time"] - prev)
            measured = r["time"] - start - costs.eval_excluded_s
            charged = costs.charged_storage_s + costs.charged_replacement_s
            points.append(Point(r["step"], costs.steps_executed, measured + charged, float(r["val_loss"]),
                                measured, charged))
        elif ev == "checkpoint_save":
            saved[r["step"]] = int(r.get("bytes", 0))
            costs.checkpoint_saves += 1
            costs.checkpoint_bytes_written += int(r.get("bytes", 0))
            costs.charged_storage_s += int(r.get("bytes", 0)) * per_mb
        elif ev == "checkpoint_load":
            nbytes = saved.get(int(r.get("resumed_from", -1)), 0)
            costs.checkpoint_loads += 1
            costs.checkpoint_bytes_read += nbytes
            costs.charged_storage_s += nbytes * per_mb
        elif ev == "failure":
            costs.failures += 1
            costs.charged_replacement_s += replacement_delay_s
        elif ev == "recovery":
            costs.recoveries += 1
        elif ev == "unrecoverable":
            costs.unrecoverable = str(r.get("reason", "unrecoverable"))
        prev = r["time"]
    last = max(r["time"] for r in timed)
    costs.measured_s = last - start - costs.eval_excluded_s
    return points, costs


def time_to_target(xs: list[float], losses: list[float], target: float) -> float | None:
    """Where the piecewise-linear curve through (x, loss) first reaches ``target`` (None: never).

    ``xs`` must be non-decreasing (wall-clock or executed steps, not the logical step)."""
    prev = None
    for x, y in zip(xs, losses):
        if y is None or not math.isfinite(y):
            continue
        if y <= target:
            if prev is None or prev[1] == y:
                return float(x)
            x0, y0 = prev
            return float(x0 + (x - x0) * (y0 - target) / (y0 - y))
        prev = (x, y)
    return None


def default_target(points: list[Point], fraction: float = 0.8) -> float:
    """The reference run's validation loss at the first validation at or after ``fraction`` of its steps."""
    if not points:
        raise ValueError("the reference run has no validation points")
    last = max(p.step for p in points)
    at = [p for p in points if p.step >= fraction * last]
    return min(at, key=lambda p: p.step).val_loss


def speedup(t_baseline: float | None, t_strategy: float | None) -> float | None:
    """How many times faster than the baseline (``t_baseline / t_strategy``); None if either never got there."""
    if t_baseline is None or t_strategy is None or t_strategy <= 0:
        return None
    return t_baseline / t_strategy


@dataclass
class Reached:
    strategy: str
    rate: float
    steps: float | None   # executed optimizer steps to the target (interpolated)
    wall_s: float | None  # wall-clock to the target (interpolated)
    final_loss: float | None
    vs_checkpoint: float | None = None
    vs_redundant: float | None = None
    best_checkpoint: str | None = None
    extra: dict = field(default_factory=dict)


def summarize(curves: dict[tuple[str, float], list[Point]], target: float) -> list[Reached]:
    """Steps and wall-clock to ``target`` per (strategy, rate), and speed-ups in wall-clock against
    the fastest checkpointing strategy of the same rate and against redundant computation."""
    out: list[Reached] = []
    for (strategy, rate), pts in curves.items():
        out.append(Reached(strategy, rate,
                           time_to_target([p.steps_executed for p in pts], [p.val_loss for p in pts], target),
                           time_to_target([p.wall_s for p in pts], [p.val_loss for p in pts], target),
                           pts[-1].val_loss if pts else None))
    for rate in sorted({r.rate for r in out}):
        same = [r for r in out if r.rate == rate]
        ckpts = [r for r in same if r.strategy.startswith("checkpoint") and r.wall_s is not None]
        best = min(ckpts, key=lambda r: r.wall_s) if ckpts else None
        red = next((r for r in same if r.strategy == "redundant"), None)
        for r in same:
            r.best_checkpoint = best.strategy if best else None
            r.vs_checkpoint = speedup(best.wall_s if best else None, r.wall_s)
            r.vs_redundant = speedup(red.wall_s if red else None, r.wall_s)
    return out


# ============================================================================ runs
def strategy_names(kinds: list[str], checkpoint_every: list[int]) -> list[str]:
    names = []
    for k in kinds:
        if k not in STRATEGY_KINDS:
            raise SystemExit(f"--strategies: unknown {k!r}; choose from {STRATEGY_KINDS}")
        names += [f"checkpoint_{n}" for n in checkpoint_every] if k == "checkpoint" else [k]
    return names


def strategy_config(name: str, a, schedule: str | None, run_dir: str) -> dict:
    ckpt_dir = os.path.join(run_dir, "ckpt")
    common = {"storage_bandwidth_mb_s": a.storage_bandwidth_mb_s}
    if schedule:
        common["failure_schedule"] = schedule
    if name == NO_FAILURE:
        cfg = base_config("off")
    elif name == "checkfree":
        cfg = base_config("checkfree", **common)
        if a.checkfree_fallback_every:
            cfg["checkfree"].update(checkpoint_every=a.checkfree_fallback_every, checkpoint_dir=ckpt_dir)
    elif name == "checkfree_plus":
        cfg = base_config("checkfree_plus", swap=True, **common)
    elif name.startswith("checkpoint_"):
        cfg = base_config("off", checkpoint_every=int(name.split("_")[1]), checkpoint_dir=ckpt_dir, **common)
    elif name == "redundant":
        cfg = base_config("redundant", **common)
    else:
        raise ValueError(name)
    return cfg


def label(name: str, a) -> str:
    if name == "checkfree":
        fb = a.checkfree_fallback_every
        return f"checkfree (fallback ckpt/{fb})" if fb else "checkfree (no fallback)"
    if name.startswith("checkpoint_"):
        return f"checkpoint every {name.split('_')[1]}"
    return name.replace("_", " ") if name != "checkfree_plus" else "checkfree+"


def run_one(name: str, rate: float, a, schedule: str | None) -> tuple[list[dict], dict]:
    """Run (or reuse) one training run; returns its records and a status dict."""
    run_dir = os.path.join(a.runs_dir, f"{name}_rate{rate:g}")
    cfg = strategy_config(name, a, schedule, run_dir)
    extra = ["--eval_every", a.eval_every, "--eval_batches", a.eval_batches, "--seed", a.seed]
    if a.num_layers:
        extra += ["--num_layers", a.num_layers]
    if a.data:
        extra += ["--data", a.data]
    spec = {"config": cfg, "extra": list(map(str, extra)), "model": a.model, "steps": a.steps,
            "schedule": json.load(open(schedule)) if schedule else None}
    spec_path = os.path.join(run_dir, "spec.json")
    status_path = os.path.join(run_dir, "status.json")
    if not a.rerun and os.path.exists(spec_path) and os.path.exists(status_path):
        with open(spec_path) as f:
            same = json.load(f) == json.loads(json.dumps(spec))
        if same:
            with open(status_path) as f:
                status = json.load(f)
            print(f"  reuse {run_dir} ({status['state']})", flush=True)
            return read_metrics(run_dir), status
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    with open(spec_path, "w") as f:
        json.dump(spec, f, indent=1)
    t0 = time.time()
    status = {"state": "finished"}
    try:
        records = run_train(cfg, run_dir, steps=a.steps, model=a.model, extra_args=extra, timeout_s=a.timeout_s,
                            quiet=True)
    except RunFailed as err:
        records = read_metrics(run_dir) if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) else []
        reason = next((r.get("reason") for r in records if r.get("event") == "unrecoverable"), None)
        status = {"state": "stopped", "reason": (reason or str(err).splitlines()[0])[:300]}
    status["launch_s"] = round(time.time() - t0, 1)
    shutil.rmtree(os.path.join(run_dir, "ckpt"), ignore_errors=True)  # keep the results dir small
    with open(status_path, "w") as f:
        json.dump(status, f)
    done = [r["step"] for r in records if _is_step(r)]
    print(f"  {name:>16} rate {rate:>4g}: {status['state']}, {len(done)} steps run "
          f"(last {done[-1] if done else '-'}), {status['launch_s']:.0f} s", flush=True)
    return records, status


# ============================================================================ outputs
def _fmt(x, digits=1, suffix=""):
    return "n/a" if x is None else f"{x:.{digits}f}{suffix}"


def _fmt_speedup(x):
    if x is None:
        return "n/a"
    change = (1 / x - 1) * 100
    return f"{x:.2f}x ({abs(change):.0f}% {'less' if change < 0 else 'more'} time)"


def write_outputs(a, names, rates, curves, costs, statuses, target, schedules, probs, prefix, elapsed_s):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(prefix + ".csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["strategy", "rate", "step", "steps_executed", "wall", "val_loss", "measured_s", "charged_s"])
        for (name, rate), pts in curves.items():
            for p in pts:
                w.writerow([name, rate, p.step, p.steps_executed, round(p.wall_s, 4), round(p.val_loss, 5),
                            round(p.measured_s, 4), round(p.charged_s, 4)])

    fig, axes = plt.subplots(2, len(rates), figsize=(5 * len(rates), 8), squeeze=False)
    ref = curves.get((NO_FAILURE, 0.0))
    for j, rate in enumerate(rates):
        for name in names:
            pts = ref if name == NO_FAILURE else curves.get((name, rate))
            if not pts:
                continue
            style = {"color": "black", "lw": 2} if name == NO_FAILURE else {}
            axes[0][j].plot([p.wall_s for p in pts], [p.val_loss for p in pts], label=label(name, a), **style)
            axes[1][j].plot([p.steps_executed for p in pts], [p.val_loss for p in pts], label=label(name, a),
                            **style)
        n_fail = len(schedules.get(rate, []))
        axes[0][j].set_title(f"{rate:g}%/stage/hour ({n_fail} failures scheduled)")
        for i, xl in enumerate(("wall-clock s (measured + charged)", "optimizer steps executed")):
            axes[i][j].axhline(target, color="grey", ls=":", lw=1)
            axes[i][j].set_xlabel(xl)
            axes[i][j].set_ylabel("validation loss")
            axes[i][j].grid(alpha=0.3)
        axes[0][j].legend(fontsize=7)
    fig.suptitle(f"{a.model}, {a.steps} steps; failures drawn at an assumed {a.assumed_step_seconds:g} s/step; "
                 f"storage {a.storage_bandwidth_mb_s:g} MB/s; replacement {a.replacement_delay_s:g} s/failure",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(prefix + ".png", dpi=110)
    plt.close(fig)

    reached = summarize({k: v for k, v in curves.items()}, target)
    lines = [f"# Convergence under failures ({'quick' if a.quick else 'full'} run)", "",
             f"Model `{a.model}`, {NUM_STAGES} pipeline stages, {a.steps} steps, validation every {a.eval_every} "
             f"steps ({a.eval_batches} batches), seed {a.seed}. Harness wall time {elapsed_s / 60:.1f} min.", "",
             f"**Target validation loss: {target:.4f}** "
             + ("(given by --target_loss)" if a.target_loss is not None else
                f"(the no-failure run's validation loss at {int(a.target_fraction * 100)}% of the steps)") + ".", "",
             "**Charged costs and assumptions** (wall-clock = measured - validation passes + charged):", "",
             f"- failures: per-stage rate turned into a per-step probability with an assumed "
             f"{a.assumed_step_seconds:g} s per step (time compression: measured steps take ~0.1 s): "
             + ", ".join(f"{r:g}%/h -> p={probs[r]:.4f}" for r in rates) + f"; schedule seed {a.failure_seed}, "
             "the same schedule replayed for every strategy; a failure fires once (not again on a redone step)",
             f"- checkpoint storage: bytes written and read charged at {a.storage_bandwidth_mb_s:g} MB/s "
             "(on top of the measured local-disk save/load time, which is kept)",
             f"- replacement node: {a.replacement_delay_s:g} s charged per lost stage, for every strategy",
             "- validation passes: measured and subtracted",
             f"- checkfree: plain CheckFree cannot rebuild stage 0 or {NUM_STAGES - 1}; "
             + (f"it rolls back to a fallback checkpoint saved every {a.checkfree_fallback_every} steps "
                "(its saves are charged like any checkpoint)" if a.checkfree_fallback_every else
                "without a fallback checkpoint its run stops at the first edge failure"),
             "- checkfree+ and redundant have no checkpoint: a loss they cannot rebuild stops the run (reported)",
             "- speed-up = baseline wall-clock to target / strategy wall-clock to target; 'vs checkpoint' uses the "
             "fastest checkpoint interval at that rate",
             "- noise: runs execute one after another on a shared machine; wall-clock gaps of a few tenths of a "
             "second are within run-to-run load variation (steps to target are exact)", ""]
    for rate in rates:
        sched = schedules.get(rate, [])
        lines += [f"## {rate:g}% per stage per hour", "",
                  "Scheduled failures (step:stage): " + (", ".join(f"{s}:{g}" for s, g in sched) or "none"), "",
                  "| strategy | state | failures hit / recovered / rollbacks | steps redone | saves | "
                  "charged s | steps to target | wall s to target | final val loss | vs checkpoint | vs redundant |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name in names:
            key = (name, 0.0) if name == NO_FAILURE else (name, rate)
            if key not in curves:
                continue
            r = next(x for x in reached if (x.strategy, x.rate) == key)
            c, st = costs[key], statuses[key]
            state = st["state"] if st["state"] == "finished" else f"stopped at step {c.steps_executed}"
            vs_c = "(baseline)" if name == r.best_checkpoint else _fmt_speedup(r.vs_checkpoint)
            vs_r = "(baseline)" if name == "redundant" else _fmt_speedup(r.vs_redundant)
            if name == NO_FAILURE and rate != 0.0:
                vs_c = vs_r = "-"
            lines.append(f"| {label(name, a)}{' (reference, no failures)' if name == NO_FAILURE else ''} | {state} | "
                         f"{c.failures} / {c.recoveries} / {c.checkpoint_loads} | {c.steps_redone} | "
                         f"{c.checkpoint_saves} | {c.charged_storage_s + c.charged_replacement_s:.2f} | "
                         f"{_fmt(r.steps)} | {_fmt(r.wall_s, 2)} | {_fmt(r.final_loss, 4)} | {vs_c} | {vs_r} |")
        for name in names:
            key = (name, rate)
            if key in statuses and statuses[key]["state"] != "finished":
                lines.append(f"\n- {label(name, a)} stopped: {statuses[key].get('reason', '')}")
        lines.append("")
    red = [(k, v) for k, v in REDUNDANT_OVERHEAD.items()]
    if red:
        lines += ["## Measured overhead of redundant computation", "",
                  "| rate | extra s/step (mean over stages) | step time s (median) | extra bytes sent/step (per stage) "
                  "| shadow memory MB (per stage) |", "|---|---|---|---|---|"]
        for rate, o in red:
            lines.append(f"| {rate:g} | {o['extra_s']:.4f} | {o['step_s']:.4f} | {o['bytes']:,} | {o['mem_mb']} |")
        lines.append("")
    text = "\n".join(lines)
    with open(prefix + ".md", "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return text


REDUNDANT_OVERHEAD: dict[float, dict] = {}


def _note_redundant(rate: float, records: list[dict]) -> None:
    ev = next((r for r in records if r.get("event") == "redundant_overhead"), None)
    steps = sorted(r["step_time_s"] for r in records if _is_step(r))
    if ev is None or not steps:
        return
    st = ev["stages"]
    REDUNDANT_OVERHEAD[rate] = {
        "extra_s": sum(s["seconds_per_step_mean"] for s in st) / len(st), "step_s": steps[len(steps) // 2],
        "bytes": max(s["bytes_sent_per_step"] for s in st),
        "mem_mb": ", ".join(f"{s['memory_bytes']['total'] / 1e6:.2f}" for s in st)}


# ============================================================================ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny, 100 steps, checkpoints every 5/20 (~8 min on 2 cores)")
    p.add_argument("--rates", type=float, nargs="+", default=None, help="percent per stage per hour")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGY_KINDS), help=f"from {STRATEGY_KINDS}")
    p.add_argument("--checkpoint_every", type=int, nargs="+", default=None, help="intervals of the checkpoint strategy")
    p.add_argument("--checkfree_fallback_every", type=int, default=None,
                   help="CheckFree's fallback checkpoint interval for edge-stage losses (0: none)")
    p.add_argument("--model", default="tiny")
    p.add_argument("--num_layers", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--eval_every", type=int, default=None)
    p.add_argument("--eval_batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="data order and model init")
    p.add_argument("--failure_seed", type=int, default=0)
    p.add_argument("--assumed_step_seconds", type=float, default=None,
                   help="step duration that turns hourly rates into per-step probabilities")
    p.add_argument("--storage_bandwidth_mb_s", type=float, default=100.0,
                   help="charged checkpoint write/read bandwidth (MB/s)")
    p.add_argument("--replacement_delay_s", type=float, default=0.0, help="charged per lost stage, every strategy")
    p.add_argument("--target_loss", type=float, default=None)
    p.add_argument("--target_fraction", type=float, default=0.8,
                   help="default target: the no-failure run's val loss at this fraction of the steps")
    p.add_argument("--data", default=None)
    p.add_argument("--runs_dir", default=None)
    p.add_argument("--out", default=None, help="prefix of the .csv/.png/.md outputs")
    p.add_argument("--rerun", action="store_true")
    p.add_argument("--timeout_s", type=float, default=None)
    a = p.parse_args(argv)
    q = a.quick
    a.rates = a.rates if a.rates is not None else [0.0, 5.0, 10.0, 16.0]
    a.rates = [float(r) for r in a.rates]
    a.steps = a.steps or (100 if q else 400)
    a.eval_every = a.eval_every or (5 if q else 10)
    a.checkpoint_every = a.checkpoint_every or ([5, 20] if q else [10, 25, 50])
    if a.checkfree_fallback_every is None:
        a.checkfree_fallback_every = 20 if q else 25
    a.assumed_step_seconds = a.assumed_step_seconds or (900.0 if q else 300.0)
    a.timeout_s = a.timeout_s or (300 if q else 1800)
    tag = "convergence_quick" if q else "convergence"
    a.runs_dir = a.runs_dir or os.path.join(RESULTS, tag + "_runs")
    prefix = a.out or os.path.join(RESULTS, tag)
    os.makedirs(a.runs_dir, exist_ok=True)
    names = strategy_names(a.strategies, a.checkpoint_every)
    t_start = time.time()

    schedules, probs, schedule_files = {}, {}, {}
    for rate in a.rates:
        probs[rate] = step_failure_probability(rate, a.assumed_step_seconds)
        if rate > 0:
            path = os.path.join(a.runs_dir, f"failures_rate{rate:g}.json")
            plan = FailurePlan(NUM_STAGES, rate_percent_per_hour=rate, step_seconds=a.assumed_step_seconds,
                               seed=a.failure_seed)
            schedules[rate] = [(f.step, f.stage) for f in plan.save(path, a.steps)]
            schedule_files[rate] = path
        print(f"rate {rate:g}%/stage/hour: p={probs[rate]:.4f} per stage per step, failures "
              f"{schedules.get(rate, [])}", flush=True)

    curves, costs, statuses = {}, {}, {}
    n_runs = (NO_FAILURE in names) + len([n for n in names if n != NO_FAILURE]) * len(a.rates)
    print(f"{n_runs} runs: {names} x rates {a.rates}", flush=True)
    for rate in a.rates:
        for name in names:
            if name == NO_FAILURE and rate != a.rates[0]:
                continue
            key = (name, 0.0 if name == NO_FAILURE else rate)
            records, status = run_one(name, key[1], a, schedule_files.get(key[1]))
            curves[key], costs[key] = wall_clock_curve(records, a.storage_bandwidth_mb_s, a.replacement_delay_s)
            statuses[key] = status
            if name == "redundant":
                _note_redundant(rate, records)

    if a.target_loss is not None:
        target = a.target_loss
    elif (NO_FAILURE, 0.0) in curves and curves[(NO_FAILURE, 0.0)]:
        target = default_target(curves[(NO_FAILURE, 0.0)], a.target_fraction)
    else:
        raise SystemExit("no no_failure run to choose a target from: pass --target_loss")
    text = write_outputs(a, names, a.rates, curves, costs, statuses, target, schedules, probs, prefix,
                         time.time() - t_start)
    print(text)
    print(f"\nwrote {prefix}.csv, {prefix}.png, {prefix}.md in {(time.time() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
