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
  (time compression, stated). ``--failure_draws logical_step`` (default): a schedule file is
  replayed and a failure fires once (a redone step does not draw again); ``executed_step``:
  every executed step draws, redone ones too.
* Wall-clock = measured (steps, redone steps, checkpoint saves/loads on local disk, recoveries,
  the redundant baselines' extra work, which runs inside the step) - validation passes +
  charged checkpoint bytes at ``--storage_bandwidth_mb_s`` + ``--replacement_delay_s`` per lost stage.
* Projection (labelled as such) to the paper's sizes: see ``project`` and the ``.md``.

    python -m benchmarks.convergence --quick   # rate 10 %/h, 2 schedules x 1 seed, 100-step reference,
                                               # every available strategy: ~15 runs, ~10-15 min on 2 cores
    python -m benchmarks.convergence           # rates 0/5/10/16, 3 schedules x 2 seeds, 400-step reference:
                                               # hours on 2 cores (do not run on a shared machine casually)

Outputs (``--out`` prefix, default ``benchmarks/results/convergence`` or ``..._quick``): ``.csv``
(every validation point of every run), ``_runs.csv`` (one row per run), ``.png`` and ``.md``.
Modules: ``convergence_strategies`` (the registry), ``convergence_stats`` (pure bookkeeping),
``convergence_report`` (the outputs), ``convergence_projection`` (the paper sizes).
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

from benchmarks._runs import RESULTS, RunFailed, last_run_stopped_early, run_train
from benchmarks.convergence_report import write_outputs
from benchmarks.convergence_stats import _is_step, _is_val, default_target, wall_clock_curve
from benchmarks.convergence_strategies import Strategy, select_strategies, strategy_config, strategy_registry
from ds_checkfree.config.checkfree import CheckFreeConfig
from ds_checkfree.recovery.injection import FailurePlan, step_failure_probability
from ds_checkfree.testing import read_metrics


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


def _records(run_dir: str) -> list[dict]:
    """A run's metrics records; none when it stopped before writing any (a launch that failed early)."""
    return read_metrics(run_dir) if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) else []


def run_one(st: Strategy, rate: float, fseed: int, tseed: int, a, schedule: str | None, steps: int,
            target: float | None, progress: Progress | None = None) -> tuple[list[dict], dict] | None:
    """Run (or reuse) one training run; returns its records and a status dict (None: not in the
    cache under ``--report_only``, which never launches anything)."""
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
            return _records(run_dir), status
        changed = sorted(k for k in set(cached) | set(wanted) if cached.get(k) != wanted.get(k))
        print(f"  {'skip' if a.report_only else 'rerun'} {run_dir}: its cached spec differs in "
              f"{', '.join(changed)}", flush=True)
        if a.report_only:
            return None
    elif a.report_only:
        print(f"  missing {run_dir} (--report_only: not run)", flush=True)
        return None
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
        records = _records(run_dir)
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
    p.add_argument("--report_only", action="store_true",
                   help="launch nothing: write the outputs from the cached runs (a long run's partial results, or "
                        "a report after a harness change); the markdown lists the runs that are missing")
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
    if a.rerun and a.report_only:
        p.error("--rerun and --report_only contradict each other: --report_only launches nothing")
    if a.failure_draws == "executed_step" and "failure_draws" not in CheckFreeConfig.field_names():
        p.error("--failure_draws executed_step needs checkfree.failure_draws, which this checkout lacks")
    return a


def output_paths(quick: bool, accelerator: str, out: str | None, runs_dir: str | None) -> tuple[str, str]:
    """(outputs prefix, run cache). The cache sits beside the outputs by default: two invocations
    with different seeds (so different targets) sharing one cache would overwrite each other's runs."""
    tag = ("convergence_quick" if quick else "convergence") + ("" if accelerator == "cpu" else "_" + accelerator)
    prefix = out or os.path.join(RESULTS, tag)
    return prefix, os.path.abspath(runs_dir or prefix + "_runs")  # absolute: run specs name paths in it


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
                # (--report_only does not rewrite an existing file: a run in progress may be reading it)
                drawn = plan.failures_between(1, a.cap_steps) if a.report_only and os.path.exists(path) \
                    else plan.save(path, a.cap_steps)
                schedules[rate][(S, never, fs)] = [(f.step, f.stage) for f in drawn]
                schedule_files[(rate, S, never, fs)] = path
        print(f"rate {rate:g}%/h: p={probs[rate]:.4f}/stage/step; failures per schedule "
              f"{ {k: len(v) for k, v in schedules[rate].items()} }", flush=True)

    runs, missing = {}, []

    def record(st, rate, fs, ts, result):
        if result is None:
            missing.append((st.name, rate, fs, ts))
            return
        records, status = result
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
        record(ref, 0.0, 0, ts, run_one(ref, 0.0, 0, ts, a, None, a.steps, None, progress))
        pts = runs.get((ref.name, 0.0, 0, ts), {}).get("points")
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
                    record(st, rate, fs, ts, run_one(st, rate, fs, ts, a, sched, a.cap_steps, target, progress))

    if missing:
        print(f"--report_only: {len(missing)} of {progress.total} runs not in the cache; the report covers the "
              "rest and says so", flush=True)
    ratios = load_step_ratios(a.step_time_csv)
    text = write_outputs(a, strategies, unavailable, a.rates, runs, target, ref_targets, schedules, probs, prefix,
                         time.time() - t_start, ratios, missing=missing)
    print(text)
    print(f"\nwrote {prefix}.csv, {prefix}_runs.csv, {prefix}.png, {prefix}.md in "
          f"{(time.time() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
