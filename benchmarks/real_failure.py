"""A real process death, timed: CheckFree's in-place recovery against restarting from a checkpoint.

Both jobs train the same model as 4 pipeline stages under Open MPI, one process per stage,
and the process of stage ``--victim`` is killed with SIGKILL once step ``--kill_step`` has
completed. The kill time is taken by this script; everything else comes from the jobs'
metrics.jsonl (wall-clock ``time`` fields, as seen by the last stage's process).

- ``checkfree``: ``mpirun --with-ft ulfm -n 5`` (4 stages + 1 spare). The survivors notice the
  broken data plane, agree on who is gone (the job's coordinator: a round and one plan), rebuild gloo and the
  DeepSpeed engine around their in-memory state, and the spare's layers are rebuilt from
  its neighbours. Phases: detection (kill -> the last stage sees the error), teardown (its
  snapshot and socket close), agreement, data plane, engine rebuild, re-materialisation,
  redoing the interrupted step.
- ``preempted`` (``--preempt_repeats``): the same CheckFree job, but the victim gets SIGTERM (a
  spot VM's preemption notice): it finishes its step, hands its stage off through the
  coordinator's store and exits; the spare loads it (exact, no convergence cost). Phases:
  finishing the step, publish + exit -> error seen, then the survivors' side as above.
- ``restart``: the conventional way. ``mpirun -n 4`` with DeepSpeed ``save_checkpoint`` every
  ``--checkpoint_every`` steps; the kill ends the whole job (mpirun aborts every rank); the
  script relaunches it with ``--resume_from`` (new processes: imports, DeepSpeed init,
  engine build), it loads the checkpoint and redoes the steps since it. Phases: job teardown
  (kill -> mpirun exits), relaunch to engine ready (process start, imports, init), checkpoint
  load, redone steps. Relaunching on the same machine is the best case: a real cluster also
  waits for a replacement node, which this does not charge.

``--launcher manual`` needs no MPI (a GPU machine often has none): the CheckFree job is a
coordinator, 4 stage processes and a spare started by hand (``scripts/kill_check.py``'s recipe)
and the restart baseline runs under ``torchrun`` (its agent ends every rank when one dies).
With ``--accelerator cuda`` (manual only) every rank shares GPU 0, each its own host to NCCL
(``scripts/one_gpu_rank.sh``), so one run gives both sides on NCCL.

Also measured: the failure-free step-time overhead of the heartbeat thread, in one elastic
launch whose heartbeat runs in alternate wall-clock windows (``heartbeat_overhead``: paired,
randomly ordered on/off windows, bootstrap CI over pairs).

    python -m benchmarks.real_failure                  # tiny, ~3 min on 2 cores
    python -m benchmarks.real_failure --overhead_pairs 0 --kill_step 30 --steps 60
    python -m benchmarks.real_failure --launcher manual --accelerator cuda --overhead_pairs 0

Writes ``benchmarks/results/real_failure.csv`` (one row per phase) and prints a table.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._runs import RESULTS, ROOT, base_config
from ds_checkfree.testing import Job, job_env, mpirun_cmd, read_metrics, recovery_phases, split, torchrun_cmd
from ds_checkfree.testing import train_args as train_script_args

#: the environment variable that carries a process's rank, per launcher
RANK_VAR = {"mpirun": "OMPI_COMM_WORLD_RANK", "manual": "RANK"}


def train_args(cfg_path: str, out: str, args, extra=()) -> list[str]:
    """``launch/train.py`` and its arguments, the same under every launcher."""
    layers = ["--num_layers", str(args.num_layers)] if args.num_layers else []
    return train_script_args(cfg_path, out, args.steps, model=args.model, extra=[*layers, *extra])


def mpirun(n: int, ft: bool, cfg_path: str, out: str, args, extra=()) -> list[str]:
    return mpirun_cmd(n, fault_tolerant=ft) + train_args(cfg_path, out, args, extra)


def launch_cmd(args, n: int, fault_tolerant: bool, cfg_path: str, out: str, extra=()) -> list[str]:
    if args.launcher == "mpirun":
        return mpirun(n, fault_tolerant, cfg_path, out, args, extra)
    if fault_tolerant:
        raise ValueError("the manual launcher starts CheckFree's job by hand (scripts/kill_check.py)")
    # torchrun: a dead rank ends the job, as under plain mpirun; on CUDA every rank on GPU 0
    return torchrun_cmd(n, args.accelerator) + train_args(cfg_path, out, args, extra)


def read(out: str) -> list[dict]:
    return read_metrics(out, missing_ok=True)


def start(args, cmd, out: str, log_path: str) -> Job:
    return Job(cmd, out, log_path, env=job_env(args.accelerator), rank_var=RANK_VAR[args.launcher])


def wait_step(job: Job, step: int, timeout: float = 600) -> None:
    try:
        if job.wait_for_step(step, timeout, poll=0.02) is None:
            raise SystemExit(f"job ended (rc={job.proc.returncode}) before step {step}; see {job.log_path}")
    except TimeoutError:
        raise SystemExit(f"step {step} not reached in {timeout} s") from None


def kill_rank(job: Job, rank: int, sig: str = "KILL") -> float:
    try:
        job.signal_rank(rank, getattr(signal, f"SIG{sig}"))
    except LookupError:
        raise SystemExit(f"rank {rank} of {job.out} not found") from None
    return time.time()


def median_step(records, first: int = 5) -> float:
    steps, _, _ = split(records)
    return statistics.median(s["step_time_s"] for s in steps if s["step"] > first)


def launch_and_kill(args, work: str, name: str, cfg: dict, n: int, fault_tolerant: bool, sig: str = "KILL"):
    """Start the job, wait for ``--kill_step``, signal the victim (SIGKILL; SIGTERM: a preemption
    notice); (job, out, config path, signal time)."""
    cfg_path = os.path.join(work, f"{name}.json")
    Path(cfg_path).write_text(json.dumps(cfg))
    out = os.path.join(work, name)
    job = start(args, launch_cmd(args, n, fault_tolerant, cfg_path, out), out, os.path.join(work, f"{name}.log"))
    wait_step(job, args.kill_step)
    return job, out, cfg_path, kill_rank(job, args.victim, sig)


def run_checkfree_repeated(args, work: str, sig: str = "KILL",
                           repeats: int | None = None) -> tuple[list[tuple[str, float]], float, list[list[float]]]:
    """``--repeats`` kill runs (``sig`` TERM: ``--preempt_repeats`` preemption notices): the median
    of each phase (the signal lands anywhere in a step, so one run is one draw), the longest
    heartbeat silence over all, and every run's values."""
    repeats = args.repeats if repeats is None else repeats
    runs = [run_checkfree(args, work, f"checkfree_{sig.lower()}_{i}", sig) for i in range(repeats)]
    names = [k for k, _ in runs[0][0]]
    values = [[dict(phases)[k] for phases, _ in runs] for k in names]
    return [(k, statistics.median(v)) for k, v in zip(names, values)], max(g for _, g in runs), values


def run_checkfree(args, work: str, name: str = "checkfree", sig: str = "KILL") -> tuple[list[tuple[str, float]], float]:
    if args.launcher == "manual":
        records, phases = run_checkfree_by_hand(args, work, name, sig)
    else:
        job, out, _, killed_at = launch_and_kill(args, work, name, base_config("checkfree", spares=1), 5, True, sig)
        if job.wait(timeout=600) != 0:
            raise SystemExit(f"the CheckFree job did not survive; see {work}/checkfree.log")
        records = read(out)
        phases = recovery_phases(records, killed_at)
    step_s = median_step(records)
    phases.append(("steps lost", 0.0))
    phases.append(("median step time", step_s))
    summary = next((r for r in records if r.get("event") == "heartbeat_summary"), {})
    return phases, summary.get("max_gap_s", float("nan"))


def run_checkfree_by_hand(args, work: str, name: str, sig: str = "KILL") -> tuple[list[dict], list[tuple[str, float]]]:
    """No MPI: ``scripts/kill_check.py`` (a coordinator, 4 stage processes and a spare started by
    hand, the victim's process signalled once ``--kill_step`` completed); its phases and the records."""
    out = os.path.join(work, name)
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "kill_check.py"), "--out", out, "--stages", "4",
           "--heartbeat_timeout_s", "10.0", "--python", sys.executable, "--model", args.model, "--steps",
           str(args.steps), "--kill_step", str(args.kill_step), "--victim", str(args.victim), "--timeout", "600",
           "--accelerator", args.accelerator, "--signal", sig]
    if args.num_layers:
        cmd += ["--num_layers", str(args.num_layers)]
    with open(out + ".log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, env=job_env(args.accelerator), stdout=log, stderr=subprocess.STDOUT)
    result = Path(out, "kill_check.json")
    if not result.exists():
        raise SystemExit(f"the CheckFree job started by hand failed; see {out}.log")
    r = json.loads(result.read_text())
    if r["failed"]:
        raise SystemExit(f"the CheckFree job did not survive ({'; '.join(r['failed'])}); see {out}")
    return read(out), [tuple(phase) for phase in r["phases"]]


def run_restart(args, work: str) -> list[tuple[str, float]]:
    ckpt = os.path.join(work, "ckpt")
    cfg = base_config("off", checkpoint_every=args.checkpoint_every, checkpoint_dir=ckpt)
    cfg["checkfree"] = {k: v for k, v in cfg["checkfree"].items() if k in ("mode", "num_stages", "checkpoint_every",
                                                                           "checkpoint_dir")}
    job, out1, cfg_path, killed_at = launch_and_kill(args, work, "restart_first", cfg, 4, False)
    job.wait(timeout=300)
    down_at = time.time()
    first = read(out1)
    last_done = max(s["step"] for s in split(first)[0])
    saved = max(e["step"] for e in split(first)[2] if e["event"] == "checkpoint_save")
    relaunch_at = time.time()
    out2 = os.path.join(work, "restart_second")
    job = start(args, launch_cmd(args, 4, False, cfg_path, out2, ["--resume_from", ckpt]), out2,
                os.path.join(work, "restart.log"))
    if job.wait(timeout=600) != 0:
        raise SystemExit(f"the restarted job failed; see {work}/restart.log")
    second = read(out2)
    _, _, events = split(second)
    run_start = next(e for e in events if e["event"] == "run_start")
    load = next(e for e in events if e["event"] == "checkpoint_load")
    steps = split(second)[0]
    caught_up = next(s for s in steps if s["step"] == last_done + 1)
    redone = next((s for s in steps if s["step"] == last_done), None)
    redo_s = (redone["time"] - load["time"]) if redone is not None and last_done > saved else 0.0
    return [(f"job teardown (kill -> {'mpirun' if args.launcher == 'mpirun' else 'torchrun'} exits)",
             down_at - killed_at),
            ("relaunch -> engine ready (start, imports, init)", run_start["engine_ready_at"] - relaunch_at),
            ("checkpoint load", load["seconds"]),
            (f"redo lost steps ({last_done - saved} steps since step {saved})",
             redo_s),
            ("total: kill -> next completed step", caught_up["time"] - killed_at),
            ("steps lost", float(last_done - saved)),
            ("median step time", median_step(first))]


def heartbeat_overhead(args, work: str, step_s: float) -> dict:
    """The heartbeat thread's step-time cost, from ONE elastic launch (4 stages + 1 spare).

    The job runs with ``--heartbeat_ab_window_s W``: every rank's heartbeat thread beats (at the
    configured interval) only in the "on" window of each pair of wall-clock windows and sleeps
    through the "off" one; which window of a pair is on is drawn per pair from a seed that is
    the pair's index (``heartbeat.monitor.ab_window_active``), so the order is random but known
    to the job and to this script. Each completed step is assigned to the window that holds
    it entirely (steps that straddle a window edge are dropped); a pair counts when both its
    windows hold at least ``--overhead_min_steps`` steps. Per pair: mean on-window step /
    mean off-window step (means, not medians: a beat touches only the few steps it overlaps,
    which a median would ignore). Estimate: geometric mean of the pair ratios, 95% CI from a
    bootstrap over pairs. Interleaving inside one run cancels start-up and drift; pairing
    adjacent windows cancels slow load changes."""
    import numpy as np
    from ds_checkfree.elastic.heartbeat.monitor import ab_window_active
    window = args.overhead_window_s
    cfg = base_config("checkfree", spares=1)
    interval = cfg["checkfree"].get("heartbeat_interval_s", 0.5)
    cfg_path = os.path.join(work, "hb.json")
    Path(cfg_path).write_text(json.dumps(cfg))
    # enough steps for the pairs asked for, at the step time the kill run measured, +25%
    steps = int(1.25 * args.overhead_pairs * 2 * window / step_s) + 10
    ab = argparse.Namespace(**{**vars(args), "steps": steps})
    out = os.path.join(work, "hb_ab")
    t0 = time.time()
    job = start(ab, mpirun(5, True, cfg_path, out, ab, ["--heartbeat_ab_window_s", str(window)]), out, out + ".log")
    # the run's own length (+100% and 10 min of start-up slack): long A/Bs must not be cut off
    if job.wait(timeout=2 * steps * step_s + 600) != 0:
        raise SystemExit(f"heartbeat A/B run failed; see {out}.log")
    records = read(out)
    steps_rec = split(records)[0]
    summary = next((r for r in records if r.get("event") == "heartbeat_summary"), {})
    per_wakeup = summary.get("cpu_per_wakeup_s")
    # every rank's thread wakes once per interval while on: their CPU demand over the machine's cores
    cores = len(os.sched_getaffinity(0))
    share = 5 * per_wakeup / interval / cores if per_wakeup is not None else None
    per_pair: dict[int, dict[bool, list[float]]] = {}
    skip = 5  # warm-up steps
    for s in steps_rec[skip:]:
        end, dur = s["time"], s["step_time_s"]
        on, pair, left = ab_window_active(end, window)
        if window - left < dur + 0.005:  # began in the previous window (5 ms slack for the record write)
            continue
        per_pair.setdefault(pair, {True: [], False: []})[on].append(dur)
    ratios, on_all, off_all = [], [], []
    for pair in sorted(per_pair):
        d = per_pair[pair]
        if len(d[True]) >= args.overhead_min_steps and len(d[False]) >= args.overhead_min_steps:
            ratios.append(statistics.fmean(d[True]) / statistics.fmean(d[False]))
            on_all += d[True]
            off_all += d[False]
    if len(ratios) < 2:
        raise SystemExit(f"heartbeat A/B: only {len(ratios)} usable pairs; raise --overhead_pairs")
    logs = np.log(np.asarray(ratios))
    rng = np.random.default_rng(args.seed)
    boots = np.exp(logs[rng.integers(0, len(logs), size=(args.bootstrap, len(logs)))].mean(axis=1))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    point = float(np.exp(logs.mean()))
    if hi < 1.01:
        verdict = "overhead below 1% (whole CI < 1.01)"
    elif lo > 1.01:
        verdict = "overhead above 1% (whole CI > 1.01)"
    else:
        verdict = "undecided: the CI contains 1.01"
    return {"ratio": point, "ci_lo": float(lo), "ci_hi": float(hi), "pairs": len(ratios), "verdict": verdict,
            "on_mean": statistics.fmean(on_all), "off_mean": statistics.fmean(off_all),
            "steps_used": len(on_all) + len(off_all), "steps": steps, "window_s": window, "interval_s": interval,
            "pair_ratios": ratios, "seconds": time.time() - t0, "cpu_per_wakeup_s": per_wakeup,
            "cpu_share": share, "ranks": 5, "cores": cores}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--num_layers", type=int, default=None)
    p.add_argument("--launcher", choices=tuple(RANK_VAR), default="mpirun",
                   help="mpirun: Open MPI (ULFM for CheckFree); manual: no MPI, CheckFree's job started by hand "
                        "with its coordinator and the restart baseline under torchrun")
    p.add_argument("--accelerator", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: every rank on GPU 0, each its own NCCL host (needs --launcher manual)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--kill_step", type=int, default=24, help="kill once this step has completed")
    p.add_argument("--victim", type=int, default=1, help="stage (= MPI rank) to kill: an intermediate one")
    p.add_argument("--checkpoint_every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="CheckFree kill runs (phases: median over them)")
    p.add_argument("--preempt_repeats", type=int, default=3,
                   help="runs whose victim gets SIGTERM instead (a preemption notice: an exact hand-off); 0 skips")
    p.add_argument("--overhead_pairs", type=int, default=40,
                   help="paired on/off heartbeat windows to aim for (0 skips the overhead measurement)")
    p.add_argument("--overhead_window_s", type=float, default=1.5, help="length of one on or off window")
    p.add_argument("--overhead_min_steps", type=int, default=4, help="steps a window needs to count")
    p.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples for the overhead CI")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--skip_restart", action="store_true", help="skip the restart-from-checkpoint baseline")
    p.add_argument("--overhead_only", action="store_true", help="only the heartbeat overhead (no kill runs)")
    p.add_argument("--overhead_step_s", type=float, default=0.12,
                   help="with --overhead_only: the step time assumed to size the run")
    p.add_argument("--out", default=os.path.join(RESULTS, "real_failure.csv"))
    args = p.parse_args(argv)
    if not 1 <= args.victim <= 2:
        raise SystemExit("--victim must be an intermediate stage (1 or 2): plain CheckFree has no rule for the edges")
    if args.accelerator == "cuda" and args.launcher != "manual":
        raise SystemExit("--accelerator cuda needs --launcher manual (the mpirun recipe does not give each rank "
                         "its own NCCL host on one GPU)")
    if args.launcher == "manual" and (args.overhead_pairs or args.overhead_only):
        raise SystemExit("the heartbeat overhead run uses mpirun: pass --overhead_pairs 0 with --launcher manual")
    work = tempfile.mkdtemp(prefix="checkfree_real_failure_")
    t0 = time.time()
    print(f"work dir {work}", flush=True)
    if args.overhead_only:
        cf, gap, per_run, rs, pre = [("median step time", args.overhead_step_s)], float("nan"), [], [], []
        args.repeats = 0
    else:
        cf, gap, per_run = run_checkfree_repeated(args, work)
        pre = run_checkfree_repeated(args, work, "TERM", args.preempt_repeats)[0] if args.preempt_repeats else []
        rs = [] if args.skip_restart else run_restart(args, work)
    how = "" if args.launcher == "mpirun" else f", started by hand, {args.accelerator}"
    rows = [(f"checkfree (coordinator, spare, in-memory{how}; median of {args.repeats})", k, v) for k, v in cf] + \
           [(f"preempted: SIGTERM answered by a hand-off (spare{how}; median of {args.preempt_repeats})", k, v)
            for k, v in pre] + \
           [(f"restart from checkpoint (every {args.checkpoint_every}"
             f"{'' if args.launcher == 'mpirun' else ', torchrun, ' + args.accelerator})", k, v) for k, v in rs]
    if args.overhead_only:
        rows = []
    elif gap:  # beats go to the coordinator, which keeps the silences: members measure none
        rows.append(("heartbeat", "longest silence of a live peer in the kill runs (s; interval 0.5, timeout 10)",
                     gap))
    hb = None
    if args.overhead_pairs:
        hb = heartbeat_overhead(args, work, dict(cf)["median step time"])
        rows.append(("heartbeat", f"step time ratio on / off (geometric mean of {hb['pairs']} paired windows)",
                     hb["ratio"]))
        rows.append(("heartbeat", "  95% bootstrap CI, low", hb["ci_lo"]))
        rows.append(("heartbeat", "  95% bootstrap CI, high", hb["ci_hi"]))
        rows.append(("heartbeat", "mean step time, heartbeat on (s)", hb["on_mean"]))
        rows.append(("heartbeat", "mean step time, heartbeat off (s)", hb["off_mean"]))
        if hb["cpu_per_wakeup_s"] is not None:
            rows.append(("heartbeat", "thread CPU per wake-up, last stage (ms)", hb["cpu_per_wakeup_s"] * 1e3))
            rows.append(("heartbeat", f"CPU share of all {hb['ranks']} threads, on {hb['cores']} cores (%)",
                         hb["cpu_share"] * 100))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["strategy", "phase", "value"])
        w.writerows((s, k, round(v, 4)) for s, k, v in rows)
    print(f"\nReal SIGKILL of stage {args.victim} after step {args.kill_step} ({args.model}, 4 stages, "
          f"{args.steps} steps); seconds unless stated\n")
    print("| strategy | phase | value |\n|---|---|---|")
    for s, k, v in rows:
        print(f"| {s} | {k} | {v:.3f} |")
    if args.repeats > 1:
        print("\nCheckFree per kill run: " + "; ".join(
            f"{k.split(' (')[0]}: " + ", ".join(f"{x:.3f}" for x in v) for (k, _), v in zip(cf, per_run)))
        runs_path = os.path.splitext(args.out)[0] + "_checkfree_runs.csv"
        with open(runs_path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["phase", *[f"run{i}" for i in range(args.repeats)]])
            w.writerows([k, *[round(x, 4) for x in v]] for (k, _), v in zip(cf, per_run))
    if hb is not None:
        print(f"\nheartbeat overhead: one launch of {hb['steps']} steps, {hb['window_s']} s windows in "
              f"{hb['pairs']} usable on/off pairs ({hb['steps_used']} steps), interval {hb['interval_s']} s: "
              f"on/off = {hb['ratio']:.4f}, 95% CI [{hb['ci_lo']:.4f}, {hb['ci_hi']:.4f}]: {hb['verdict']} "
              f"({hb['seconds']:.0f} s)")
        if hb["cpu_share"] is not None:
            print(f"heartbeat thread CPU: {hb['cpu_per_wakeup_s'] * 1e3:.3f} ms per wake-up (last stage), every "
                  f"{hb['interval_s']} s on {hb['ranks']} ranks = {hb['cpu_share'] * 100:.3f}% of {hb['cores']} "
                  "cores: the thread's direct cost")
        pairs_path = os.path.splitext(args.out)[0] + "_heartbeat_pairs.csv"
        with open(pairs_path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["pair", "ratio_on_off"])
            w.writerows((i, round(r, 6)) for i, r in enumerate(hb["pair_ratios"]))
    print(f"\nwrote {args.out} in {time.time() - t0:.0f} s")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
