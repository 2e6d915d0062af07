"""Recovery phases against job size (issue #29): does anything but the redone step grow with the job?

One real job per shape, S stages x R data-parallel replicas + 1 spare (``mpirun --with-ft ulfm``,
tiny model, CPU/gloo, ``OMP_NUM_THREADS=1``, eval off), hit by ``--kills`` SIGKILLs in turn.
Each kill lands a uniformly drawn fraction of a step time after a step completed, on the
member holding a slot drawn at random (R = 1: an intermediate stage, rebuilt by CheckFree's
weighted average; R > 1: any slot but the metrics writer's, an exact copy from a live replica).
The spare takes the slot; then a process started by hand with ``--join`` becomes the next
spare (the job keeps its size), and once it is admitted and three more steps completed, the
next kill comes. The job is stopped after the last recovery.

Per kill, from the metrics writer's (last stage's) ``recovery`` and ``recovery_timeline``
events: detection (kill -> error seen), teardown (snapshot + leave the plane), agreement
(round -> plan), data plane (new gloo group), engine rebuild (with its groups kept and formed
anew), re-materialisation, the redone step (-> next completed step), the total (kill -> next
completed step); from every member's rebuild line in the logs, the slowest member's time in
forming groups anew and how many members formed any; whether any log line says a gloo wait
timed out; the join latency (joiner started -> admitted as the spare).

    flock /tmp/cpu.lock .venv/bin/python -m benchmarks.recovery_scaling --shapes 4x1,4x2,4x4,4x8 --kills 4
    .venv/bin/python -m benchmarks.recovery_scaling --report_only      # table + plot from the CSV

Without MPI, ``--launcher direct`` starts the coordinator and every member by hand; with
``--accelerator cuda`` every member runs on GPU 0 as its own NCCL host (one GPU, several
ranks: ``scripts/gpu_check.sh`` runs it with ``GPU_CHECK_SCALING=4x1,4x2``). Give such a run its
own ``--out``: one file holds one protocol.

Writes ``benchmarks/results/recovery_scaling.csv`` (one row per kill, naming commit, date,
machine and protocol; rows of other shapes already there are kept, a shape run again is
replaced), ``recovery_scaling.md`` (medians per shape) and ``recovery_scaling.png`` (each
phase against ranks), both made by ``recovery_scaling_report``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks._runs import RESULTS, base_config
from benchmarks.kill_campaign_report import machine
from benchmarks.recovery_scaling_report import PHASES, REBUILD_PARTS, read_rows, report, write_rows
from ds_checkfree.elastic.standby_groups import read_rebuild_lines
from ds_checkfree.testing import Job, events_of, job_env, mpirun_cmd, standalone_env, steps_of, train_args
from ds_checkfree.testing.direct_job import DirectJob
from ds_checkfree.testing.procs import kill_group

OUT = os.path.join(RESULTS, "recovery_scaling.csv")
#: per replica and step: micro-batches of this many sequences. The default is the smallest
#: pipeline step: on 2 cores a step of 17 processes is mostly scheduling, and the redone step
#: (an ordinary step, not a recovery cost) would otherwise hide what the recovery costs
MICRO_BATCH, MICRO_BATCHES = 1, 2


#: the first kill comes after this step: every member's idle copies of its groups have formed
#: (2-9 steps into a generation, ``standby_groups``), as they have before every later kill (a
#: join and three steps come between kills)
FIRST_KILL_AFTER = 12


def protocol(micro_batch: int, micro_batches: int, launcher: str = "mpirun", accelerator: str = "cpu") -> str:
    how = ("mpirun --with-ft ulfm" if launcher == "mpirun" else
           "no launcher (a coordinator and every member started by hand with --join)")
    plane = ("CPU gloo, OMP_NUM_THREADS=1" if accelerator == "cpu" else
             "CUDA NCCL, every member on GPU 0 as its own NCCL host")
    return (f"{how}, S stages x R replicas + 1 spare, tiny LLaMA (8 layers, or S if more), "
            f"{micro_batches} micro-batches of {micro_batch} sequence{'s' if micro_batch > 1 else ''} (64 tokens) "
            f"per replica and step, {plane}, one kill at a time (the first after step {FIRST_KILL_AFTER}), each spare "
            "replaced by a "
            "--join process before the next kill; phases from the metrics writer's recovery_timeline, groups "
            "formed from every member's rebuild line")


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for part in text.split(","):
        try:
            s, r = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {part!r} is not STAGESxREPLICAS (e.g. 4x2)") from None
        if s < 3 or r < 1:
            raise SystemExit(f"--shapes: {part!r}: at least 3 stages (an intermediate one to kill) and 1 replica")
        shapes.append((s, r))
    return shapes


def allowed_slots(stages: int, replicas: int) -> list[int]:
    """Slots a kill may hit: with one replica an intermediate stage (CheckFree's rule needs both
    neighbours); with more any slot but the metrics writer's (the last stage's replica 0)."""
    if replicas == 1:
        return list(range(1, stages - 1))
    writer = (stages - 1) * replicas
    return [s for s in range(stages * replicas) if s != writer]


def phases_of(rec: dict, line: dict, killed_at: float) -> dict:
    return {"detection_s": rec["failed_at"] - killed_at, "teardown_s": rec["revoked_at"] - rec["failed_at"],
            "agreement_s": rec["agreement_s"], "data_plane_s": rec["data_plane_s"],
            "engine_rebuild_s": rec["engine_rebuild_s"], "rematerialise_s": rec["rematerialise_s"],
            "redo_step_s": line["next_step_done_at"] - rec["rematerialised_at"],
            "total_s": line["next_step_done_at"] - killed_at,
            **{k: rec.get(k, float("nan")) for k in REBUILD_PARTS},
            "rebuild_groups_kept": rec.get("rebuild_groups_kept", float("nan"))}


def groups_across_members(paths) -> dict:
    """The newest generation's rebuild as every member logged it (``standby_groups.rebuild_line``):
    the slowest member's time in forming groups anew (the recovery's critical path through them;
    the metrics writer's own is ``rebuild_groups_s``) and how many members formed any group."""
    found = []
    for p in paths:
        try:
            found += read_rebuild_lines(Path(p).read_text(errors="replace"))
        except OSError:
            pass
    if not found:
        return {"groups_slowest_s": float("nan"), "members_forming": float("nan")}
    newest = max(line["generation"] for line in found)
    mine = [line for line in found if line["generation"] == newest]
    return {"groups_slowest_s": max(line["seconds"] for line in mine),
            "members_forming": sum(bool(line["formed"]) for line in mine)}


def timeouts_in(paths) -> int:
    """Lines saying a gloo wait (or any data-plane wait) ran out of time."""
    n = 0
    for p in paths:
        try:  # gloo: "Timed out waiting ...ms for ..."; NCCL's watchdog: "... timed out"
            n += sum(1 for line in Path(p).read_text(errors="replace").splitlines() if "timed out" in line.lower())
        except OSError:
            pass
    return n


class ShapeRun:
    """One job of one shape, its kills and its joiners."""

    def __init__(self, work: Path, stages: int, replicas: int, kills: int, seed: int, timeout_s: float,
                 micro_batch: int = MICRO_BATCH, micro_batches: int = MICRO_BATCHES, launcher: str = "mpirun",
                 accelerator: str = "cpu"):
        """``launcher``: "mpirun" (``--with-ft ulfm``) or "direct" (a coordinator and every
        member started by hand, ``ds_checkfree.testing.direct_job``: where there is no MPI, and
        the way to run on one GPU with NCCL, ``accelerator`` "cuda")."""
        self.stages, self.replicas, self.kills, self.timeout_s = stages, replicas, kills, timeout_s
        self.micro_batch, self.micro_batches = micro_batch, micro_batches
        self.launcher, self.accelerator = launcher, accelerator
        self.dir = work / f"{stages}x{replicas}"
        self.dir.mkdir(parents=True)
        self.out = self.dir / "out"
        self.rng = random.Random(seed)
        cfg = base_config("checkfree", num_stages=stages, spares=1)
        cfg.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=micro_batches)
        self.cfg = self.dir / "ds.json"
        self.cfg.write_text(json.dumps(cfg))
        self.extra = ["--num_layers", str(max(8, stages))]
        self.joiners: list[subprocess.Popen] = []
        self.logs = [self.dir / "log.txt"]

    def train_args(self) -> list[str]:
        return train_args(self.cfg, self.out, 100000, extra=self.extra)

    def run(self, on_kill=lambda rows: None) -> list[dict]:
        """The kills' rows; ``on_kill(rows so far)`` after each (a run cut short keeps them)."""
        n = self.stages * self.replicas + 1
        if self.launcher == "direct":
            self.job = DirectJob(self.cfg, self.out, 100000, n, num_stages=self.stages, dp=self.replicas,
                                 accelerator=self.accelerator, extra=self.extra, timeout_s=self.timeout_s)
            self.logs = self.job.logs  # the job adds each member's log, joiners included
        else:
            self.job = Job([*mpirun_cmd(n, fault_tolerant=True), *self.train_args()], self.out, self.logs[0],
                           env=job_env(self.accelerator))
        rows = []
        try:
            self._wait(lambda: self.job.last_step() and self.job.last_step()["step"] >= FIRST_KILL_AFTER,
                       f"step {FIRST_KILL_AFTER}")
            ranks = self.job.rank_pids()
            holder = {slot: ranks[slot] for slot in range(n - 1)}  # slot -> pid; MPI rank = slot at launch
            spare = ranks[n - 1]
            join_latency = None
            for k in range(1, self.kills + 1):
                rows.append(self._one_kill(k, holder, spare, join_latency))
                spare, join_latency = self._replace_spare(k)
                rows[-1]["join_latency_s"] = join_latency
                on_kill(rows)
                print(f"  {self.stages}x{self.replicas} kill {k}: " + ", ".join(
                    f"{label} {rows[-1][key]:.3f}" for key, label in PHASES) + f"; join {join_latency:.1f} s",
                      flush=True)
        finally:
            self.job.stop()
            for j in self.joiners:
                kill_group(j)
        return rows

    def _wait(self, cond, what: str, timeout: float | None = None):
        deadline = time.time() + (timeout or self.timeout_s)
        while True:
            got = cond()
            if got:
                return got
            if self.job.proc.poll() is not None:
                raise RuntimeError(f"{self.stages}x{self.replicas}: the job ended waiting for {what} (log {self.dir})")
            if time.time() > deadline:
                raise RuntimeError(f"{self.stages}x{self.replicas}: {what} not within {timeout or self.timeout_s:.0f} s "
                                   f"(log {self.dir})")
            time.sleep(0.02)

    def _one_kill(self, k: int, holder: dict, spare: int, join_latency) -> dict:
        records = self.job.records()
        last = steps_of(records)[-1]
        recent = [s["step_time_s"] for s in steps_of(records)[-5:] if "step_time_s" in s]
        step_s = statistics.median(recent) if recent else 0.2
        frac = self.rng.random()
        slot = self.rng.choice(allowed_slots(self.stages, self.replicas))
        self._wait(lambda: self.job.last_step()["step"] > last["step"], "the next step")
        after = self.job.last_step()["step"]
        time.sleep(frac * step_s)
        timeouts_before = timeouts_in(self.logs)
        os.kill(holder[slot], signal.SIGKILL)
        killed_at = time.time()
        holder[slot] = spare
        lines = self._wait(lambda: len(events_of(self.job.records(), "recovery_timeline")) >= k and
                           events_of(self.job.records(), "recovery_timeline"), f"recovery {k}")
        records = self.job.records()
        rec = [r for r in events_of(records, "recovery")][-1]
        row = {"shape": f"{self.stages}x{self.replicas}", "stages": self.stages, "replicas": self.replicas,
               "ranks": self.stages * self.replicas + 1, "micro_batch": self.micro_batch,
               "micro_batches": self.micro_batches, "kill": k, "victim_slot": slot,
               "victim_stage": slot // self.replicas, "method": rec["method"], "after_step": after,
               "step_time_s": step_s, **phases_of(rec, lines[k - 1], killed_at),
               "timeout_reached": timeouts_in(self.logs) > timeouts_before, "join_latency_s": join_latency,
               **groups_across_members(self.logs)}
        return row

    def _replace_spare(self, k: int) -> tuple[int, float]:
        """Start a joiner; once it waits as the spare and three more steps completed, its pid
        and how long it took to be admitted."""
        started = time.time()
        if self.launcher == "direct":
            n = self.stages * self.replicas + 1
            proc = self.job.add_member(n + k - 1)  # its own NCCL host id and log
            log = self.job.logs[-1]
        else:
            info = self._wait(lambda: next((json.loads(p.read_text())
                                            for p in sorted(self.out.glob("coordinator-*.json")) if p.stat().st_size),
                                           None), "the coordinator's address")
            log = self.dir / f"joiner{k}.txt"
            self.logs.append(log)
            proc = subprocess.Popen([sys.executable, *self.train_args(), "--join", f"127.0.0.1:{info['port']}"],
                                    env=standalone_env(self.accelerator), stdout=open(log, "w"),
                                    stderr=subprocess.STDOUT, start_new_session=True)
            self.joiners.append(proc)
        self._wait(lambda: "spare: waiting" in log.read_text(errors="replace") or proc.poll() is not None,
                   f"joiner {k} admitted")
        if proc.poll() is not None:
            raise RuntimeError(f"joiner {k} exited ({proc.returncode}); see {log}")
        admitted = time.time() - started
        step = self.job.last_step()["step"]
        self._wait(lambda: self.job.last_step()["step"] >= step + 3, "three steps after the join")
        return proc.pid, admitted


# ----------------------------------------------------------------------------- results
def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=RESULTS).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, cwd=RESULTS).stdout.strip()
        return head + (" +changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4x1,4x2,4x4,4x8", help="STAGESxREPLICAS, comma-separated (+1 spare each)")
    p.add_argument("--kills", type=int, default=4, help="kills per shape (one job each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--micro_batch", type=int, default=MICRO_BATCH, help="sequences per micro-batch")
    p.add_argument("--micro_batches", type=int, default=MICRO_BATCHES, help="micro-batches per replica and step")
    p.add_argument("--timeout_s", type=float, default=900.0, help="bound on each wait (start-up, recovery, join)")
    p.add_argument("--out", default=OUT)
    p.add_argument("--report_only", action="store_true", help="table and plot from the CSV, no runs")
    p.add_argument("--launcher", choices=("mpirun", "direct"), default="mpirun",
                   help="mpirun --with-ft ulfm, or direct: a coordinator and every member started by hand (no MPI)")
    p.add_argument("--accelerator", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: NCCL, every member on GPU 0 as its own NCCL host (use with --launcher direct)")
    a = p.parse_args(argv)
    if a.accelerator == "cuda" and a.launcher != "direct":
        p.error("--accelerator cuda needs --launcher direct: several members on one GPU must each be started "
                "as their own NCCL host (NCCL_HOSTID), which the direct launcher does")
    # a timeout's SIGTERM unwinds like an error: the job and its joiners are stopped, not orphaned
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows = read_rows(a.out)
    if not a.report_only:
        shapes = parse_shapes(a.shapes)
        meta = {"commit": git_commit(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "machine": machine(), "protocol": protocol(a.micro_batch, a.micro_batches, a.launcher, a.accelerator)}
        work = Path(tempfile.mkdtemp(prefix="recovery_scaling_"))
        print(f"work dir {work}", flush=True)
        for i, (s, r) in enumerate(shapes):
            t0 = time.time()
            others = [x for x in rows if x["shape"] != f"{s}x{r}"]

            def keep(new, others=others):  # after every kill: a run cut short keeps what it measured
                nonlocal rows
                rows = others + [dict(x, **meta) for x in new]
                write_rows(a.out, rows)
            try:
                new = ShapeRun(work, s, r, a.kills, a.seed * 1000 + i, a.timeout_s, a.micro_batch,
                               a.micro_batches, a.launcher, a.accelerator).run(keep)
            except RuntimeError as err:
                print(f"  {s}x{r}: FAILED: {err}", flush=True)
                continue
            print(f"  {s}x{r}: {len(new)} kills in {time.time() - t0:.0f} s", flush=True)
    if not rows:
        raise SystemExit(f"no rows in {a.out}")
    report(rows, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
