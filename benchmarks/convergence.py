"""Convergence under failures: CheckFree / CheckFree+ against checkpointing and redundant computation.

Protocol (every choice printed in the ``.md``):

* Strategies come from one registry (``strategy_registry``; ``--strategies`` picks by name or
  kind). Adding one is one line. A strategy that needs a ``checkfree`` config key this checkout
  does not have yet (``requires``) is listed as "not available" instead of run.
* Reference: mode "off", no failures, ``--steps`` steps, once per training seed. Target
  validation loss: the highest of the references' losses at ``--target_fraction`` of their
  steps (so every reference reaches it there).
* Every other strategy runs until its validation loss reaches the target or until 3x the
  reference's steps (``--cap_factor``), whichever comes first (the run is stopped at the
  target). A run that never reached it is reported as ">N" (N = steps executed by then).
* Noise: each cell (strategy, rate) is run for every failure schedule (``--failure_seeds``,
  each one a seeded schedule written once per stage count and replayed for every strategy with
  that stage count) x every training seed (``--train_seeds``: data order and init). Reported:
  mean ± sd of steps-to-target (executed optimizer steps, redone steps included) and of
  wall-clock to target; gaps against the fastest strategy of the rate with a Welch 2-SE band
  ("inside the noise" when the gap is within it).
* Failures: per-stage rate turned into a per-step probability at ``--assumed_step_seconds``
  (time compression, stated). A failure fires once (a redone step does not draw again) until
  per-executed-step draws land in the training code.
* Wall-clock = measured (steps, redone steps, checkpoint saves/loads on local disk, recoveries,
  the redundant baselines' extra work, which runs inside the step) - validation passes +
  charged checkpoint bytes at ``--storage_bandwidth_mb_s`` + ``--replacement_delay_s`` per lost stage.
* Projection (labelled as such) to the paper's sizes: see ``project`` and the ``.md``.

    python benchmarks/convergence.py --quick   # rate 10 %/h, 2 schedules x 1 seed, 100-step reference,
                                               # every available strategy: ~15 runs, ~10-15 min on 2 cores
    python benchmarks/convergence.py           # rates 0/5/10/16, 3 schedules x 2 seeds, 400-step reference:
                                               # hours on 2 cores (do not run on a shared machine casually)

Outputs (``--out`` prefix, default ``benchmarks/results/convergence`` or ``..._quick``): ``.csv``
(every validation point of every run), ``_runs.csv`` (one row per run), ``.png`` and ``.md``.
Finished runs are kept in ``--runs_dir`` (default: the ``--out`` prefix + ``_runs``) and reused when
their spec matches (``--rerun`` redoes them; a mismatch is printed with the keys that differ).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _runs import RESULTS, RunFailed, base_config, last_run_stopped_early, read_metrics, run_train  # noqa: E402

from ds_checkfree.config import CheckFreeConfig  # noqa: E402
from ds_checkfree.failures import FailurePlan, step_failure_probability  # noqa: E402

NO_FAILURE = "no_failure"


# ============================================================================ strategies
@dataclass(frozen=True)
class Strategy:
    """One way of surviving failures, as the harness runs it."""
    name: str
    mode: str                       # checkfree.mode
    label: str
    num_stages: int = 4
    checkfree: tuple = ()           # extra checkfree keys, as (key, value) pairs
    checkpoint_every: int = 0       # checkpoint interval (the baseline's, or CheckFree's fallback)
    requires: tuple = ()            # checkfree config keys this strategy needs
    recovery: str = "convergence"   # projection model: "reference", "convergence", "rollback", "exact"
    step_variant: str = "stock"     # which step_time.py variant gives its step-time ratio

    def available(self) -> bool:
        return all(k in CheckFreeConfig.field_names() for k in self.requires)

    @property
    def layout(self) -> str:
        return dict(self.checkfree).get("layout", "all_stages_fail")

    def never_fail(self) -> list[int]:
        """Stages its layout excludes from failures (the paper layout's embedding and head stages)."""
        if self.layout == "all_stages_fail":
            return []
        from ds_checkfree.layout import never_fail_stages
        return list(never_fail_stages(self.num_stages, self.layout))


def strategy_registry(checkpoint_every: list[int], fallback_every: int) -> list[Strategy]:
    """Every strategy the harness knows, in table order. One line each."""
    fb = (f"fallback ckpt/{fallback_every}" if fallback_every else "no fallback")
    out = [
        Strategy(NO_FAILURE, "off", "no failures (reference)", recovery="reference"),
        Strategy("checkfree", "checkfree", f"CheckFree, all stages fail ({fb})", checkpoint_every=fallback_every,
                 step_variant="checkfree"),
        # the paper's layout: embedding alone on stage 0 and norm + head alone on stage S-1 (never fail),
        # 4 block stages in between as in the reference's 124M config; first/last block stage from a copy
        Strategy("checkfree_paper", "checkfree", "CheckFree, paper layout (emb + 4 block stages + head)",
                 num_stages=6, checkfree=(("layout", "paper"),), requires=("layout",), step_variant="checkfree"),
        Strategy("checkfree_stageclip", "checkfree", f"CheckFree, per-stage clipping ({fb})",
                 checkfree=(("clip_scope", "stage"),), checkpoint_every=fallback_every, requires=("clip_scope",),
                 step_variant="checkfree"),
        Strategy("checkfree_plus", "checkfree_plus", "CheckFree+, 4 stages (every stage swapped)",
                 checkfree=(("swap", True),), step_variant="plus"),
        Strategy("checkfree_plus_6", "checkfree_plus", "CheckFree+, 6 stages", num_stages=6,
                 checkfree=(("swap", True),), step_variant="plus"),
    ]
    out += [Strategy(f"checkpoint_{k}", "off", f"checkpoint/{k}, global rollback", checkpoint_every=k,
                     recovery="rollback") for k in checkpoint_every]
    # the paper's checkpoint baseline: the new node reloads its stage's stale state, the others go on
    out += [Strategy(f"ckpt_stage_{k}", "off", f"checkpoint/{k}, stage-only reload (no rollback)",
                     checkfree=(("checkpoint_restore", "lost_stage"),), checkpoint_every=k,
                     requires=("checkpoint_restore",))
            for k in checkpoint_every]
    out += [
        Strategy("redundant", "redundant", "redundant computation (Bamboo: redundant forward)",
                 checkfree=(("redundant_forward", True),), requires=("redundant_forward",), recovery="exact",
                 step_variant="redundant"),
        Strategy("redundant_lb", "redundant", "redundant, lower bound (gradient shipping only)",
                 checkfree=(("redundant_forward", False),), requires=("redundant_forward",), recovery="exact",
                 step_variant="redundant_lb"),
    ]
    return out


def select_strategies(registry: list[Strategy], wanted: list[str]) -> list[Strategy]:
    """By name, or by kind: "checkpoint" = every checkpoint_K, "ckpt_stage" = every ckpt_stage_K,
    "all" = everything. The reference is always included first."""
    chosen = []
    for w in wanted:
        if w == "all":
            hits = registry
        elif w in ("checkpoint", "ckpt_stage"):
            hits = [s for s in registry if s.name.startswith(w + "_")]
        else:
            hits = [s for s in registry if s.name == w]
        if not hits:
            raise SystemExit(f"--strategies: unknown {w!r}; choose from {[s.name for s in registry]} "
                             "(or the kinds checkpoint, ckpt_stage, all)")
        chosen += [s for s in hits if s not in chosen]
    ref = next(s for s in registry if s.name == NO_FAILURE)
    return [ref] + [s for s in chosen if s.name != NO_FAILURE]


def strategy_config(st: Strategy, a, schedule: str | None, run_dir: str) -> dict:
    ckpt_dir = os.path.join(run_dir, "ckpt")
    extra = dict(st.checkfree)
    if st.mode != "off" or st.checkpoint_every or schedule:
        extra["storage_bandwidth_mb_s"] = a.storage_bandwidth_mb_s
    if schedule and getattr(a, "failure_draws", None) == "executed_step":
        # every executed step draws (redone ones too): seeded draws at the rate instead of a replayed file
        rate, seed = schedule
        extra.update(failure_rate=rate, assumed_step_seconds=a.assumed_step_seconds, failure_seed=seed,
                     failure_draws="executed_step")
    elif schedule:
        extra["failure_schedule"] = schedule
    if st.checkpoint_every:
        extra.update(checkpoint_every=st.checkpoint_every, checkpoint_dir=ckpt_dir)
    cfg = base_config(st.mode, **extra)
    cfg["checkfree"]["num_stages"] = st.num_stages
    return cfg


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
class Outcome:
    """One run's result against the target: reached (value) or censored at its cut-off (value = cut-off)."""
    value: float
    reached: bool


def run_outcomes(points: list[Point], costs: Costs, target: float) -> tuple[Outcome, Outcome]:
    """(steps-to-target, wall-clock-to-target) of one run; a run that never reached the target is
    censored at the steps it executed and the wall-clock it had used."""
    steps = time_to_target([p.steps_executed for p in points], [p.val_loss for p in points], target)
    wall = time_to_target([p.wall_s for p in points], [p.val_loss for p in points], target)
    if steps is not None and wall is not None:
        return Outcome(steps, True), Outcome(wall, True)
    end_wall = points[-1].wall_s if points else costs.measured_s
    return (Outcome(float(costs.steps_executed), False),
            Outcome(float(max(end_wall, costs.measured_s + costs.charged_storage_s + costs.charged_replacement_s)),
                    False))


def modelled_wall(steps: Outcome, step_s: float, step_ratio: float, charged_s: float) -> Outcome:
    """Wall-clock to the target from the noise-free steps: steps x the reference's median step time
    x the strategy's step-time ratio (measured by step_time.py in interleaved rounds) + the costs
    charged up to there (checkpoint bytes, replacement). Censored like its steps."""
    return Outcome(steps.value * step_s * step_ratio + charged_s, steps.reached)


def charged_at_target(points: list[Point], target: float) -> float:
    """Charged seconds at the first validation at or below the target (else at the last one)."""
    hit = next((p for p in points if p.val_loss <= target), points[-1] if points else None)
    return hit.charged_s if hit is not None else 0.0


@dataclass
class Summary:
    """Mean ± sd over the runs of one cell; with censored runs the mean is a lower bound."""
    n: int
    reached: int
    mean: float
    sd: float
    cut_off: float | None   # smallest cut-off among censored runs

    @property
    def censored(self) -> bool:
        return self.reached < self.n


def summarize_outcomes(outs: list[Outcome]) -> Summary | None:
    if not outs:
        return None
    vals = [o.value for o in outs]
    cens = [o.value for o in outs if not o.reached]
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return Summary(len(outs), len(outs) - len(cens), statistics.fmean(vals), sd, min(cens) if cens else None)


def fmt_summary(s: Summary | None, digits: int = 0) -> str:
    """"mean ± sd" when every run reached the target; ">N" when none did (N: the smallest cut-off);
    "≥mean (k/n reached)" when some did (censored runs counted at their cut-off: a lower bound)."""
    if s is None:
        return "n/a"
    if s.reached == 0:
        return f">{s.cut_off:.{digits}f}"
    body = f"{s.mean:.{digits}f} ± {s.sd:.{digits}f}" if s.n > 1 else f"{s.mean:.{digits}f} (n=1)"
    if not s.censored:
        return body
    return f"≥{s.mean:.{digits}f} ({s.reached}/{s.n} reached; rest >{s.cut_off:.{digits}f})"


def gap_vs(a: Summary | None, b: Summary | None, z: float = 2.0, sys_a: float = 0.0,
           sys_b: float = 0.0) -> tuple[float, float, bool] | None:
    """(mean(a) - mean(b), z * standard error, inside the noise?) or None when either cell is
    censored, missing or a single run (a gap to a censored cell is not a measured gap). The
    standard error is Welch's over runs, plus ``sys_a``/``sys_b`` in quadrature: standard errors
    that do not shrink with more runs (a measured step-time ratio's uncertainty)."""
    if a is None or b is None or a.censored or b.censored or a.n < 2 or b.n < 2:
        return None
    se = math.sqrt((a.sd ** 2) / a.n + (b.sd ** 2) / b.n + sys_a ** 2 + sys_b ** 2)
    diff = a.mean - b.mean
    return diff, z * se, abs(diff) <= z * se


def extra_steps_per_failure(runs: list[tuple[float, int]], ref_steps: float) -> tuple[float, float] | None:
    """From (steps-to-target, failures) per run with at least one failure: each run's extra steps
    over the reference's ``ref_steps`` per failure it saw; returns (mean, sd) over runs."""
    per = [(s - ref_steps) / f for s, f in runs if f > 0]
    if not per:
        return None
    return statistics.fmean(per), (statistics.stdev(per) if len(per) > 1 else 0.0)


# ============================================================================ projection
#: nominal parameter counts and failing (block) stages of the paper's models; per-iteration
#: failure probabilities hard-coded in the reference code (gensyn-ai/CheckFree), with the %/h they label
PAPER_MODELS = {"124M": (124e6, 4), "500M": (500e6, 6), "1.5B": (1.5e9, 6)}
PAPER_PROBABILITIES = {"124M": [(10.0, 0.0006), (16.0, 0.001)],
                       "500M": [(5.0, 0.0009), (10.0, 0.002), (16.0, 0.004)],
                       "1.5B": [(10.0, 0.004), (16.0, 0.008)]}
#: checkpoint bytes per parameter: bf16 weights (2) + fp32 master weights (4) + Adam moments (2 x 4)
CKPT_BYTES_PER_PARAM = 14


def implied_step_seconds(p: float, rate_percent_per_hour: float) -> float:
    """The step time at which a per-step probability ``p`` is ``rate`` %/h (the paper's pairs)."""
    return 3600.0 * math.log(1.0 - p) / math.log(1.0 - rate_percent_per_hour / 100.0)


def young_interval(save_s: float, step_s: float, failures_per_step: float) -> int:
    """Young's optimal checkpoint interval in steps, sqrt(2 C / lambda) with lambda per second."""
    if failures_per_step <= 0:
        return 10 ** 9
    lam = failures_per_step / step_s
    return max(1, round(math.sqrt(2.0 * save_s / lam) / step_s))


def project(kind: str, *, ref_steps: float, step_s: float, step_ratio: float, stages: int, p: float,
            save_s: float, load_s: float, interval: int | None = None,
            extra_per_failure: tuple[float, float] | None = None) -> dict:
    """Projected wall-clock to the target for one strategy at one paper size and rate.

    Expected failures F = stages * p * steps. ``rollback``: every failure redoes on average
    interval/2 steps and reloads (``load_s``); saves every ``interval`` steps (``save_s``).
    ``exact``: no extra steps (exact restore). ``convergence``: extra steps per failure from
    our runs (mean, sd): every failure costs that many steps; returned at the mean (``abs``)
    and at mean + 1 sd (``rel``, the pessimistic end). Step time = ``step_s * step_ratio``;
    ``stage`` reload charges ``load_s`` per failure on top."""
    f_rate = stages * p
    out = {"failures": f_rate * ref_steps}
    if kind == "rollback":
        k = interval or young_interval(save_s, step_s, f_rate)
        # redone steps also fail: steps solve S = ref + f_rate * S * k / 2
        denom = 1.0 - f_rate * k / 2.0
        steps = ref_steps / denom if denom > 0 else math.inf
        fails = f_rate * steps
        t = steps * step_s * step_ratio + (steps / k) * save_s + fails * load_s
        out.update(interval=k, steps=steps, failures=fails, abs=t, rel=t)
        return out
    if kind in ("exact", "reference"):
        t = ref_steps * step_s * step_ratio
        out.update(steps=ref_steps, abs=t, rel=t)
        return out
    if extra_per_failure is None:
        out.update(steps=None, abs=None, rel=None)
        return out
    mean, sd = extra_per_failure
    fails = f_rate * ref_steps
    saves = (ref_steps / interval) * save_s if interval else 0.0
    reload = fails * load_s if kind == "stage" else 0.0
    s_abs = ref_steps + mean * fails
    s_rel = ref_steps + (mean + sd) * fails
    out.update(steps_abs=s_abs, steps_rel=s_rel,
               abs=s_abs * step_s * step_ratio + saves + reload if s_abs > 0 else None,
               rel=s_rel * step_s * step_ratio + saves + reload if s_rel > 0 else None)
    return out


def load_step_ratios(path: str) -> dict[str, tuple[float, float, float]]:
    """variant -> (ratio vs stock, CI low, CI high) from a ``step_time.py --csv`` file."""
    out = {"stock": (1.0, 1.0, 1.0)}
    if not path or not os.path.exists(path):
        return out
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            out[row["variant"]] = (float(row["ratio_vs_stock"]), float(row["ratio_vs_stock_ci_lo"]),
                                   float(row["ratio_vs_stock_ci_hi"]))
    return out


# ============================================================================ runs
class Progress:
    """``[k/N]`` before each run and, once runs were launched, a rough time left (the mean
    launched run's seconds x the runs left; runs under failures last longer than early ones)."""

    def __init__(self, total: int):
        self.total, self.done, self.launched_s = total, 0, []

    def tick(self, launched_s: float | None) -> str:
        self.done += 1
        if launched_s is not None:
            self.launched_s.append(launched_s)
        left = self.total - self.done
        eta = ""
        if self.launched_s and left:
            eta = f", ~{left * statistics.mean(self.launched_s) / 60:.0f} min left if the rest run"
        return f"[{self.done}/{self.total}{eta}]"


def run_one(st: Strategy, rate: float, fseed: int, tseed: int, a, schedule: str | None, steps: int,
            target: float | None, progress: Progress | None = None) -> tuple[list[dict], dict]:
    """Run (or reuse) one training run; returns its records and a status dict."""
    run_dir = os.path.join(a.runs_dir, f"{st.name}_rate{rate:g}_f{fseed}_s{tseed}")
    cfg = strategy_config(st, a, schedule, run_dir)
    extra = ["--eval_every", a.eval_every, "--eval_batches", a.eval_batches, "--seed", tseed]
    if a.num_layers:
        extra += ["--num_layers", a.num_layers]
    if a.data:
        extra += ["--data", a.data]
    spec = {"config": cfg, "extra": list(map(str, extra)), "model": a.model, "steps": steps, "target": target,
            "schedule": json.load(open(schedule)) if isinstance(schedule, str) else schedule}
    if a.accelerator != "cpu":  # (CPU runs' specs predate the key: absent means cpu)
        spec["accelerator"] = a.accelerator
    spec_path = os.path.join(run_dir, "spec.json")
    status_path = os.path.join(run_dir, "status.json")
    if not a.rerun and os.path.exists(spec_path) and os.path.exists(status_path):
        with open(spec_path) as f:
            cached = json.load(f)
        wanted = json.loads(json.dumps(spec))
        if cached == wanted:
            with open(status_path) as f:
                status = json.load(f)
            print(f"  {progress.tick(None) if progress else ''} reuse {run_dir} ({status['state']})", flush=True)
            return read_metrics(run_dir), status
        changed = sorted(k for k in set(cached) | set(wanted) if cached.get(k) != wanted.get(k))
        print(f"  rerun {run_dir}: its cached spec differs in {', '.join(changed)}", flush=True)
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    with open(spec_path, "w") as f:
        json.dump(spec, f, indent=1)
    t0 = time.time()
    status = {"state": "finished"}
    started = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
               "load_1min_at_start": os.getloadavg()[0]}

    def reached(records):
        return any(_is_val(r) and r["val_loss"] <= target for r in records)

    try:
        records = run_train(cfg, run_dir, steps=steps, model=a.model, num_gpus=st.num_stages, extra_args=extra,
                            timeout_s=a.timeout_s, quiet=True, stop_when=reached if target is not None else None,
                            accelerator=a.accelerator)
        if last_run_stopped_early():
            status = {"state": "reached target"}
    except RunFailed as err:
        records = read_metrics(run_dir) if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) else []
        reason = next((r.get("reason") for r in records if r.get("event") == "unrecoverable"), None)
        status = {"state": "stopped", "reason": (reason or str(err).splitlines()[0])[:300]}
    status["launch_s"] = round(time.time() - t0, 1)
    status.update(started)
    shutil.rmtree(os.path.join(run_dir, "ckpt"), ignore_errors=True)  # keep the results dir small
    with open(status_path, "w") as f:
        json.dump(status, f)
    done = [r["step"] for r in records if _is_step(r)]
    print(f"  {st.name:>18} rate {rate:>4g} sched {fseed} seed {tseed}: {status['state']}, {len(done)} steps run "
          f"(last {done[-1] if done else '-'}), {status['launch_s']:.0f} s "
          f"{progress.tick(status['launch_s']) if progress else ''}", flush=True)
    return records, status


# ============================================================================ outputs
def _fmt(x, digits=1, suffix=""):
    return "n/a" if x is None else f"{x:.{digits}f}{suffix}"


def write_outputs(a, strategies, unavailable, rates, runs, target, ref_targets, schedules, probs, prefix,
                  elapsed_s, ratios):
    by_name = {st.name: st for st in strategies}
    # the stock step time: every run's median step time divided by its strategy's ratio, median over runs
    per_run = [runs[k]["step_s"] / ratios.get(by_name[k[0]].step_variant, (1.0,))[0] for k in runs
               if runs[k].get("step_s")]
    t_ref = statistics.median(per_run) if per_run else float("nan")

    def ratio_rel_se(name):  # the step-time ratio's 95% CI as a relative standard error
        r, lo, hi = ratios.get(by_name[name].step_variant, (1.0, 1.0, 1.0))
        return (hi - lo) / 3.92 / r
    """``runs``: (strategy name, rate, failure seed, train seed) -> dict(points, costs, status)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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

    fig, axes = plt.subplots(1, len(rates), figsize=(5 * len(rates), 4), squeeze=False)
    for j, rate in enumerate(rates):
        for st in strategies:
            r = 0.0 if st.name == NO_FAILURE else rate
            ks = sorted(k for k in runs if k[0] == st.name and k[1] == r)
            for i, k in enumerate(ks):
                pts = runs[k]["points"]
                axes[0][j].plot([p.steps_executed for p in pts], [p.val_loss for p in pts], lw=0.8,
                                color=f"C{strategies.index(st) % 10}", label=st.name if i == 0 else None)
        axes[0][j].axhline(target, color="grey", ls=":", lw=1)
        axes[0][j].set_title(f"{rate:g} %/stage/hour (p={probs[rate]:.4f}/step)")
        axes[0][j].set_xlabel("optimizer steps executed")
        axes[0][j].set_ylabel("validation loss")
        axes[0][j].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(prefix + ".png", dpi=100)
    plt.close(fig)

    L = [f"# Convergence under failures ({'quick' if a.quick else 'full'} run)", "",
         f"Model `{a.model}`" + (f" with {a.num_layers} decoder layers" if a.num_layers else "")
         + f"; reference {a.steps} steps; validation every {a.eval_every} steps ({a.eval_batches} batches); "
         f"training seeds {a.train_seeds}; failure schedules (seeds) {a.failure_seeds}; "
         f"cap {a.cap_factor:g}x the reference = {a.cap_steps} logical steps. Harness wall time "
         f"{elapsed_s / 60:.1f} min this invocation; the runs' own launches took "
         f"{sum(v['status'].get('launch_s', 0) for v in runs.values()) / 60:.1f} min (finished runs are reused); "
         "this machine: 2 shared CPU cores, no GPU.", "",
         f"Command: `python benchmarks/convergence.py {' '.join(a.argv)}`; outputs written "
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
    if unavailable:
        L += ["**Not available in this checkout** (their config keys have not landed): "
              + "; ".join(f"`{s.name}` ({s.label}; needs checkfree.{', '.join(s.requires)})" for s in unavailable),
              ""]
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
            L.append(f"| {st.label} | {len(ks)} | {statistics.fmean(fl):.1f} | {redone:.1f} | {fmt_summary(ss)} | "
                     f"{fmt_summary(ws, 1)} | {fmt_summary(ms, 1)} | {gap(1, fastest)} | {gap(0, fewest)} |")
        stopped = [(k, runs[k]["status"]) for k in runs if k[1] == rate and runs[k]["status"]["state"] == "stopped"]
        for k, s in stopped:
            L.append(f"\n- {k[0]} (schedule {k[2]}, seed {k[3]}) stopped: {s.get('reason', '')}")
        L.append("")

    L += projection_section(a, strategies, outcomes, ratios)
    text = "\n".join(L)
    with open(prefix + ".md", "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return text


def projection_section(a, strategies, outcomes, ratios) -> list[str]:
    ref_runs = [v[0] for k, v in outcomes.items() if k[0] == NO_FAILURE]
    ref_steps_ours = statistics.fmean(o.value for o in ref_runs) if ref_runs else None
    L = ["## Projection to the paper's sizes (a model, not a measurement)", "",
         "Inputs, every one printed: reference iterations to target N_ref = "
         f"{a.projection_ref_steps:,} (a stand-in: the reference code's ablation length, not measured); step time T = "
         "the step time the paper's own (p, %/h) pair implies, T = 3600 ln(1-p) / ln(1-h); checkpoint bytes = "
         f"{CKPT_BYTES_PER_PARAM} B/parameter (bf16 weights 2 + fp32 masters 4 + Adam moments 8) / stages per "
         f"node, written and read at {a.projection_bandwidth_gb_s:g} GB/s per node, all stages in parallel; "
         "expected failures F = stages x p x steps; step-time ratios vs stock measured here by "
         f"`benchmarks/step_time.py` ({a.step_time_csv}, 4 stages tiny model): "
         + ", ".join(f"{k} {v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for k, v in ratios.items()) + ".", "",
         "Per strategy: checkpoint rollback: Young's interval k = sqrt(2 C_save / lambda), every failure redoes k/2 "
         "steps (redone steps fail too) and reloads; redundant: no extra steps (exact restore), its measured step "
         "ratio; CheckFree/CheckFree+ (and stage-only reload): extra steps per failure from our runs (each run's "
         "steps-to-target minus the reference's mean, divided by the failures it saw; mean and sd over runs; "
         "censored runs count at their cut-off, a lower bound), applied as a fixed number of steps per failure "
         "at the paper's failure count, at the mean and at mean + 1 sd. **Assumption that carries the "
         "projection**: a failure costs a 0.1-1.5B model the same number of steps it costs our tiny model; nothing "
         "here tests it. Replacement-node time is the same for every strategy and left out.", ""]
    if ref_steps_ours is None:
        return L + ["(no reference run: no projection)", ""]
    per_failure = {}
    for st in strategies:
        if st.recovery not in ("convergence", "stage"):
            continue
        runs = [(o[0].value, o[2]) for k, o in outcomes.items() if k[0] == st.name and o[2] > 0]
        cens = sum(1 for k, o in outcomes.items() if k[0] == st.name and o[2] > 0 and not o[0].reached)
        e = extra_steps_per_failure(runs, ref_steps_ours)
        if e is not None:
            per_failure[st.name] = (e, len(runs), cens)
    L += [f"| strategy | runs with failures | extra steps per failure, mean ± sd (reference {ref_steps_ours:.0f} "
          "steps) |", "|---|---|---|"]
    for name, (e, n, cens) in per_failure.items():
        L.append(f"| {name} | {n}{f' ({cens} censored: lower bound)' if cens else ''} | {e[0]:+.2f} ± {e[1]:.2f} |")
    L += ["", "| size | stages | %/h | p (paper) | T s (implied) | ckpt GB/node | save s | strategy | step ratio | "
          "steps (mean / +1 sd) | failures | hours to target (mean / +1 sd) |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for size, (nparams, stages) in PAPER_MODELS.items():
        ckpt = nparams * CKPT_BYTES_PER_PARAM / stages
        save_s = ckpt / (a.projection_bandwidth_gb_s * 1e9)
        for h, p in PAPER_PROBABILITIES[size]:
            T = implied_step_seconds(p, h)
            for st in strategies:
                if st.recovery == "reference":
                    continue
                kind = st.recovery if st.recovery != "convergence" or not st.name.startswith("ckpt_stage") else "stage"
                ratio = ratios.get(st.step_variant, (1.0, 1.0, 1.0))[0]
                e = per_failure.get(st.name, (None,))[0]
                pr = project(kind, ref_steps=a.projection_ref_steps, step_s=T, step_ratio=ratio, stages=stages, p=p,
                             save_s=save_s, load_s=save_s, interval=None if kind == "rollback" else
                             (st.checkpoint_every or None), extra_per_failure=e)
                if kind == "rollback" and st.name != f"checkpoint_{a.checkpoint_every[0]}":
                    continue  # one row: Young's interval does not depend on our intervals
                name = "checkpoint (Young's k={}), global rollback".format(pr.get("interval")) \
                    if kind == "rollback" else st.name
                steps = (f"{pr['steps']:,.0f}" if pr.get("steps") is not None else
                         f"{_fmt(pr.get('steps_abs'), 0)} / {_fmt(pr.get('steps_rel'), 0)}")
                hours = (f"{pr['abs'] / 3600:.1f}" if kind in ("rollback", "exact") and pr["abs"] is not None else
                         f"{_fmt(pr['abs'] and pr['abs'] / 3600)} / {_fmt(pr['rel'] and pr['rel'] / 3600)}")
                L.append(f"| {size} | {stages} | {h:g} | {p} | {T:.1f} | {ckpt / 1e9:.2f} | {save_s:.2f} | {name} | "
                         f"{ratio:.3f} | {steps} | {pr['failures']:.1f} | {hours} |")
    L.append("")
    return L


# ============================================================================ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="rate 10 only, 2 schedules x 1 seed, 100-step reference, checkpoints every 5/20")
    p.add_argument("--rates", type=float, nargs="+", default=None, help="percent per stage per hour")
    p.add_argument("--strategies", nargs="+", default=["all"],
                   help="names or kinds (checkpoint, ckpt_stage, all); see strategy_registry")
    p.add_argument("--checkpoint_every", type=int, nargs="+", default=None,
                   help="intervals of the checkpoint baselines")
    p.add_argument("--checkfree_fallback_every", type=int, default=None,
                   help="plain CheckFree's fallback checkpoint interval for edge-stage losses (0: none)")
    p.add_argument("--model", default="tiny", help="preset or YAML; on a GPU e.g. small (12M parameters)")
    p.add_argument("--accelerator", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: every run's ranks share GPU 0 (scripts/one_gpu_rank.sh); outputs get a _cuda suffix")
    p.add_argument("--num_layers", type=int, default=None,
                   help="decoder layers (default 12 when a 6-stage strategy runs, so 4 and 6 stages divide it)")
    p.add_argument("--steps", type=int, default=None, help="the reference's steps")
    p.add_argument("--cap_factor", type=float, default=3.0, help="other strategies run up to this x the reference")
    p.add_argument("--eval_every", type=int, default=None)
    p.add_argument("--eval_batches", type=int, default=4)
    p.add_argument("--train_seeds", type=int, nargs="+", default=None, help="data order and model init")
    p.add_argument("--failure_seeds", type=int, nargs="+", default=None, help="one failure schedule each")
    p.add_argument("--assumed_step_seconds", type=float, default=None,
                   help="step duration that turns hourly rates into per-step probabilities")
    p.add_argument("--storage_bandwidth_mb_s", type=float, default=100.0,
                   help="charged checkpoint write/read bandwidth (MB/s)")
    p.add_argument("--replacement_delay_s", type=float, default=0.0, help="charged per lost stage, every strategy")
    p.add_argument("--target_loss", type=float, default=None)
    p.add_argument("--target_fraction", type=float, default=0.8,
                   help="default target: the references' val loss at this fraction of the steps (highest over seeds)")
    p.add_argument("--step_time_csv", default=os.path.join(RESULTS, "step_time_redundant.csv"),
                   help="step_time.py --redundant CSV with every strategy's step-time ratio (projection input)")
    p.add_argument("--projection_ref_steps", type=int, default=10_000)
    p.add_argument("--projection_bandwidth_gb_s", type=float, default=0.1,
                   help="per-node checkpoint bandwidth for the projection (default: the 100 MB/s charged here)")
    p.add_argument("--failure_draws", choices=("logical_step", "executed_step"), default="logical_step",
                   help="logical_step: a seeded schedule file replayed for every strategy, a redone step never "
                        "fails again; executed_step: seeded draws on every executed step (needs "
                        "checkfree.failure_draws)")
    p.add_argument("--data", default=None)
    p.add_argument("--runs_dir", default=None, help="where finished runs are kept and reused (default: the "
                   "--out prefix + _runs)")
    p.add_argument("--out", default=None, help="prefix of the outputs")
    p.add_argument("--rerun", action="store_true")
    p.add_argument("--timeout_s", type=float, default=None)
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    q = a.quick
    a.rates = [float(r) for r in (a.rates if a.rates is not None else ([10.0] if q else [0.0, 5.0, 10.0, 16.0]))]
    a.steps = a.steps or (100 if q else 400)
    a.cap_steps = int(math.ceil(a.cap_factor * a.steps))
    a.eval_every = a.eval_every or (5 if q else 10)
    a.checkpoint_every = a.checkpoint_every or ([5, 20] if q else [10, 25, 50])
    if a.checkfree_fallback_every is None:
        a.checkfree_fallback_every = 20 if q else 25
    a.assumed_step_seconds = a.assumed_step_seconds or (900.0 if q else 300.0)
    a.train_seeds = a.train_seeds if a.train_seeds is not None else ([0] if q else [0, 1])
    a.failure_seeds = a.failure_seeds if a.failure_seeds is not None else ([0, 1] if q else [0, 1, 2])
    a.timeout_s = a.timeout_s or (600 if q else 3600)
    if a.failure_draws == "executed_step" and "failure_draws" not in CheckFreeConfig.field_names():
        p.error("--failure_draws executed_step needs checkfree.failure_draws, which this checkout lacks")
    return a


def output_paths(quick: bool, accelerator: str, out: str | None, runs_dir: str | None) -> tuple[str, str]:
    """(outputs prefix, run cache). The cache sits beside the outputs by default: two invocations
    with different seeds (so different targets) sharing one cache would overwrite each other's runs."""
    tag = ("convergence_quick" if quick else "convergence") + ("" if accelerator == "cpu" else "_" + accelerator)
    prefix = out or os.path.join(RESULTS, tag)
    return prefix, runs_dir or prefix + "_runs"


def main(argv=None) -> int:
    a = parse_args(argv)
    registry = strategy_registry(a.checkpoint_every, a.checkfree_fallback_every)
    chosen = select_strategies(registry, a.strategies)
    strategies = [s for s in chosen if s.available()]
    unavailable = [s for s in chosen if not s.available()]
    if a.num_layers is None and any(s.num_stages == 6 for s in strategies):
        a.num_layers = 12
    prefix, a.runs_dir = output_paths(a.quick, a.accelerator, a.out, a.runs_dir)
    os.makedirs(a.runs_dir, exist_ok=True)
    t_start = time.time()
    print(f"strategies: {[s.name for s in strategies]}; not available: {[s.name for s in unavailable]}", flush=True)

    probs, schedules, schedule_files = {}, {}, {}
    # one schedule per (stages, stages that never fail, failure seed): draws are seeded by
    # (seed, step, stage), so the same seed fails the same (step, stage) slots in every layout
    shapes = sorted({(s.num_stages, tuple(s.never_fail())) for s in strategies})
    for rate in a.rates:
        probs[rate] = step_failure_probability(rate, a.assumed_step_seconds)
        schedules[rate] = {}
        if rate <= 0:
            continue
        for S, never in shapes:
            for fs in a.failure_seeds:
                tag = f"_nf{'-'.join(map(str, never))}" if never else ""
                path = os.path.join(a.runs_dir, f"failures_rate{rate:g}_S{S}{tag}_f{fs}.json")
                extra = {"never_fail": never} if never else {}
                plan = FailurePlan(S, rate_percent_per_hour=rate, step_seconds=a.assumed_step_seconds, seed=fs,
                                   **extra)
                schedules[rate][(S, never, fs)] = [(f.step, f.stage) for f in plan.save(path, a.cap_steps)]
                schedule_files[(rate, S, never, fs)] = path
        print(f"rate {rate:g}%/h: p={probs[rate]:.4f}/stage/step; failures per schedule "
              f"{ {k: len(v) for k, v in schedules[rate].items()} }", flush=True)

    runs = {}

    def record(st, rate, fs, ts, records, status):
        pts, costs = wall_clock_curve(records, a.storage_bandwidth_mb_s, a.replacement_delay_s)
        step_times = [r["step_time_s"] for r in records if _is_step(r) and "step_time_s" in r]
        runs[(st.name, rate, fs, ts)] = {"points": pts, "costs": costs, "status": status,
                                         "started": status.get("started_utc"), "load": status.get("load_1min_at_start"),
                                         "step_s": statistics.median(step_times) if step_times else None}

    ref = strategies[0]
    ref_targets = {}
    progress = Progress(len(a.train_seeds) * (1 + sum(len(a.failure_seeds if rate > 0 else [0]) for rate in a.rates)
                                              * len(strategies[1:])))
    for ts in a.train_seeds:
        records, status = run_one(ref, 0.0, 0, ts, a, None, a.steps, None, progress)
        record(ref, 0.0, 0, ts, records, status)
        pts = runs[(ref.name, 0.0, 0, ts)]["points"]
        if pts:
            ref_targets[ts] = default_target(pts, a.target_fraction)
    if a.target_loss is not None:
        target = a.target_loss
    elif ref_targets:
        target = max(ref_targets.values())
    else:
        raise SystemExit("no reference run to choose a target from: pass --target_loss")
    print(f"target validation loss {target:.4f}", flush=True)

    for rate in a.rates:
        for st in strategies[1:]:
            for fs in (a.failure_seeds if rate > 0 else [0]):
                for ts in a.train_seeds:
                    sched = schedule_files.get((rate, st.num_stages, tuple(st.never_fail()), fs))
                    if sched and a.failure_draws == "executed_step":
                        sched = (rate, fs)
                    records, status = run_one(st, rate, fs, ts, a, sched, a.cap_steps, target, progress)
                    record(st, rate, fs, ts, records, status)

    ratios = load_step_ratios(a.step_time_csv)
    text = write_outputs(a, strategies, unavailable, a.rates, runs, target, ref_targets, schedules, probs, prefix,
                         time.time() - t_start, ratios)
    print(text)
    print(f"\nwrote {prefix}.csv, {prefix}_runs.csv, {prefix}.png, {prefix}.md in "
          f"{(time.time() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
