"""The convergence harness's bookkeeping, pure: curves from metrics records, steps and wall-clock
to the target (censored runs kept as such), mean ± sd per cell and gaps with their noise band."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


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

