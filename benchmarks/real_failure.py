"""A real process death, timed: CheckFree's in-place recovery against restarting from a checkpoint.

Both jobs train the same model as 4 pipeline stages under Open MPI, one process per stage,
and the process of stage ``--victim`` is killed with SIGKILL once step ``--kill_step`` has
completed. The kill time is taken by this script; everything else comes from the jobs'
metrics.jsonl (wall-clock ``time`` fields, as seen by the last stage's process).

- ``checkfree``: ``mpirun --with-ft ulfm -n 5`` (4 stages + 1 spare). The survivors notice the
  broken data plane, agree on who is gone (ULFM Revoke + Shrink), rebuild gloo and the
  DeepSpeed engine around their in-memory state, and the spare's layers are rebuilt from
  its neighbours. Phases: detection (kill -> the last stage sees the error), teardown (its
  snapshot and socket close), agreement, data plane, engine rebuild, re-materialisation,
  redoing the interrupted step.
- ``restart``: the conventional way. ``mpirun -n 4`` with DeepSpeed ``save_checkpoint`` every
  ``--checkpoint_every`` steps; the kill ends the whole job (mpirun aborts every rank); the
  script relaunches it with ``--resume_from`` (new processes: imports, DeepSpeed init,
  engine build), it loads the checkpoint and redoes the steps since it. Phases: job teardown
  (kill -> mpirun exits), relaunch to engine ready (process start, imports, init), checkpoint
  load, redone steps. Relaunching on the same machine is the best case: a real cluster also
  waits for a replacement node, which this does not charge.

Also measured: the failure-free step-time overhead of the heartbeat thread, as the ratio of
median step times of the elastic job with and without it (``--no_heartbeat``), in
alternating rounds.

    python benchmarks/real_failure.py                  # tiny, ~3 min on 2 cores
    python benchmarks/real_failure.py --overhead_rounds 0 --kill_step 30 --steps 60

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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _runs import RESULTS, ROOT, base_config, split  # noqa: E402

BIN = Path(sys.executable).parent
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
           OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")


def mpirun(n: int, ft: bool, cfg_path: str, out: str, args, extra=()) -> list[str]:
    cmd = [str(BIN / "mpirun")] + (["--with-ft", "ulfm"] if ft else []) + [
        "--oversubscribe", "--map-by", "slot", "--bind-to", "none", "-n", str(n),
        "-x", "OMP_NUM_THREADS", "-x", "DS_ACCELERATOR", "-x", "PYTHONUNBUFFERED",
        sys.executable, os.path.join(ROOT, "launch", "train.py"), "--deepspeed_config", cfg_path,
        "--model", args.model, "--steps", str(args.steps), "--eval_every", "0", "--output_dir", out]
    if args.num_layers:
        cmd += ["--num_layers", str(args.num_layers)]
    return cmd + list(extra)


def read(out: str) -> list[dict]:
    try:
        with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []


def rank_pid(out: str, rank: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if out.encode() not in (entry / "cmdline").read_bytes().split(b"\0"):
                continue
            if f"OMPI_COMM_WORLD_RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
        except OSError:
            continue
    return None


def start(cmd, log_path) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_step(proc, out: str, step: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"job ended (rc={proc.returncode}) before step {step}; see {out}/../*.log")
        steps, _, _ = split(read(out))
        if any(s["step"] >= step for s in steps):
            return
        time.sleep(0.02)
    raise SystemExit(f"step {step} not reached in {timeout} s")


def kill_rank(out: str, rank: int) -> float:
    pid = rank_pid(out, rank)
    if pid is None:
        raise SystemExit(f"rank {rank} of {out} not found")
    os.kill(pid, signal.SIGKILL)
    return time.time()


def median_step(records, first: int = 5) -> float:
    steps, _, _ = split(records)
    return statistics.median(s["step_time_s"] for s in steps if s["step"] > first)


def launch_and_kill(args, work: str, name: str, cfg: dict, n: int, fault_tolerant: bool):
    """Start the job, wait for ``--kill_step``, SIGKILL the victim; (proc, out, config path, kill time)."""
    cfg_path = os.path.join(work, f"{name}.json")
    Path(cfg_path).write_text(json.dumps(cfg))
    out = os.path.join(work, name)
    proc = start(mpirun(n, fault_tolerant, cfg_path, out, args), os.path.join(work, f"{name}.log"))
    wait_step(proc, out, args.kill_step)
    return proc, out, cfg_path, kill_rank(out, args.victim)


def run_checkfree(args, work: str) -> list[tuple[str, float]]:
    proc, out, _, killed_at = launch_and_kill(args, work, "checkfree", base_config("checkfree", spares=1), 5, True)
    if proc.wait(timeout=600) != 0:
        raise SystemExit(f"the CheckFree job did not survive; see {work}/checkfree.log")
    records = read(out)
    rec = next(r for r in records if r.get("event") == "recovery")
    line = next(r for r in records if r.get("event") == "recovery_timeline")
    phases = [("detection (kill -> error seen by the last stage)", rec["failed_at"] - killed_at),
              ("snapshot + close sockets", rec["revoked_at"] - rec["failed_at"]),
              ("agreement (ULFM revoke + shrink)", rec["agreed_at"] - rec["revoked_at"]),
              ("data plane (new gloo group)", rec["data_plane_s"]),
              ("engine rebuild (in-memory state)", rec["engine_rebuild_s"]),
              ("re-materialisation (CheckFree)", rec["rematerialise_s"]),
              ("redo the interrupted step", line["next_step_done_at"] - rec["rematerialised_at"]),
              ("total: kill -> next completed step", line["next_step_done_at"] - killed_at)]
    step_s = median_step(records)
    phases.append(("steps lost", 0.0))
    phases.append(("median step time", step_s))
    return phases


def run_restart(args, work: str) -> list[tuple[str, float]]:
    ckpt = os.path.join(work, "ckpt")
    cfg = base_config("off", checkpoint_every=args.checkpoint_every, checkpoint_dir=ckpt)
    cfg["checkfree"] = {k: v for k, v in cfg["checkfree"].items() if k in ("mode", "num_stages", "checkpoint_every",
                                                                           "checkpoint_dir")}
    proc, out1, cfg_path, killed_at = launch_and_kill(args, work, "restart_first", cfg, 4, False)
    proc.wait(timeout=300)
    down_at = time.time()
    first = read(out1)
    last_done = max(s["step"] for s in split(first)[0])
    saved = max(e["step"] for e in split(first)[2] if e["event"] == "checkpoint_save")
    relaunch_at = time.time()
    out2 = os.path.join(work, "restart_second")
    proc = start(mpirun(4, False, cfg_path, out2, args, ["--resume_from", ckpt]), os.path.join(work, "restart.log"))
    if proc.wait(timeout=600) != 0:
        raise SystemExit(f"the restarted job failed; see {work}/restart.log")
    second = read(out2)
    _, _, events = split(second)
    run_start = next(e for e in events if e["event"] == "run_start")
    load = next(e for e in events if e["event"] == "checkpoint_load")
    steps = split(second)[0]
    caught_up = next(s for s in steps if s["step"] == last_done + 1)
    redone = next((s for s in steps if s["step"] == last_done), None)
    redo_s = (redone["time"] - load["time"]) if redone is not None and last_done > saved else 0.0
    return [("job teardown (kill -> mpirun exits)", down_at - killed_at),
            ("relaunch -> engine ready (start, imports, init)", run_start["engine_ready_at"] - relaunch_at),
            ("checkpoint load", load["seconds"]),
            (f"redo lost steps ({last_done - saved} steps since step {saved})",
             redo_s),
            ("total: kill -> next completed step", caught_up["time"] - killed_at),
            ("steps lost", float(last_done - saved)),
            ("median step time", median_step(first))]


def heartbeat_overhead(args, work: str) -> tuple[float, float, list[float], list[float]]:
    cfg = base_config("checkfree", spares=1)
    cfg_path = os.path.join(work, "hb.json")
    Path(cfg_path).write_text(json.dumps(cfg))
    on, off, gaps = [], [], []
    for rnd in range(args.overhead_rounds):
        for with_hb in (True, False) if rnd % 2 == 0 else (False, True):
            out = os.path.join(work, f"hb_{rnd}_{with_hb}")
            proc = start(mpirun(5, True, cfg_path, out, args, [] if with_hb else ["--no_heartbeat"]), out + ".log")
            if proc.wait(timeout=600) != 0:
                raise SystemExit(f"heartbeat round failed; see {out}.log")
            records = read(out)
            (on if with_hb else off).append(median_step(records))
            if with_hb:
                summary = next(r for r in records if r.get("event") == "heartbeat_summary")
                gaps.append(summary["max_gap_s"])
    return statistics.median(on) / statistics.median(off), max(gaps), on, off


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--num_layers", type=int, default=None)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--kill_step", type=int, default=24, help="kill once this step has completed")
    p.add_argument("--victim", type=int, default=1, help="stage (= MPI rank) to kill: an intermediate one")
    p.add_argument("--checkpoint_every", type=int, default=10)
    p.add_argument("--overhead_rounds", type=int, default=2, help="0 skips the heartbeat overhead measurement")
    p.add_argument("--out", default=os.path.join(RESULTS, "real_failure.csv"))
    args = p.parse_args(argv)
    if not 1 <= args.victim <= 2:
        raise SystemExit("--victim must be an intermediate stage (1 or 2): plain CheckFree has no rule for the edges")
    work = tempfile.mkdtemp(prefix="checkfree_real_failure_")
    t0 = time.time()
    print(f"work dir {work}", flush=True)
    cf = run_checkfree(args, work)
    rs = run_restart(args, work)
    rows = [("checkfree (ULFM, spare, in-memory)", k, v) for k, v in cf] + \
           [(f"restart from checkpoint (every {args.checkpoint_every})", k, v) for k, v in rs]
    if args.overhead_rounds:
        ratio, gap, on, off = heartbeat_overhead(args, work)
        rows.append(("heartbeat", "median step time ratio (heartbeat on / off)", ratio))
        rows.append(("heartbeat", "median step time, heartbeat on (s)", statistics.median(on)))
        rows.append(("heartbeat", "median step time, heartbeat off (s)", statistics.median(off)))
        rows.append(("heartbeat", "longest silence of a live peer (s; interval 0.5, timeout 10)", gap))
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
    print(f"\nwrote {args.out} in {time.time() - t0:.0f} s")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
