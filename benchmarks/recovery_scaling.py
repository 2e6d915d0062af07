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
(round -> plan), data plane (new gloo group), engine rebuild, re-materialisation, the redone
step (-> next completed step), the total (kill -> next completed step); whether any log line
says a gloo wait timed out; the join latency (joiner started -> admitted as the spare).

    flock /tmp/cpu.lock .venv/bin/python -m benchmarks.recovery_scaling --shapes 4x1,4x2,4x4,4x8 --kills 4
    .venv/bin/python -m benchmarks.recovery_scaling --report_only      # table + plot from the CSV

Without MPI, ``--launcher direct`` starts the coordinator and every member by hand; with
``--accelerator cuda`` every member runs on GPU 0 as its own NCCL host (one GPU, several
ranks: ``scripts/gpu_check.sh`` runs it with ``GPU_CHECK_SCALING=4x1,4x2``). Give such a run its
own ``--out``: one file holds one protocol.

Writes ``benchmarks/results/recovery_scaling.csv`` (one row per kill, naming commit, date,
machine and protocol; rows of other shapes already there are kept, a shape run again is
replaced), ``recovery_scaling.md`` (medians per shape) and ``recovery_scaling.png`` (each
phase against ranks).
"""
from __future__ import annotations

import argparse
import csv
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
from ds_checkfree.testing import Job, events_of, job_env, mpirun_cmd, standalone_env, steps_of, train_args
from ds_checkfree.testing.direct_job import DirectJob
from ds_checkfree.testing.procs import kill_group

OUT = os.path.join(RESULTS, "recovery_scaling.csv")
#: (column, label) of each phase, in the order they happen
PHASES = [("detection_s", "detection"), ("teardown_s", "snapshot + leave plane"), ("agreement_s", "agreement"),
          ("data_plane_s", "data plane"), ("engine_rebuild_s", "engine rebuild"),
          ("rematerialise_s", "re-materialise"), ("redo_step_s", "redone step"), ("total_s", "total")]
#: the engine rebuild's parts (the recovery event's ``rebuild_*``): the module with its process
#: groups, of which forming the groups (``new_group`` calls) alone and that member's CPU time in
#: them (the rest: waiting for the groups' other members), and DeepSpeed's engine
REBUILD_PARTS = ["rebuild_module_s", "rebuild_groups_s", "rebuild_groups_cpu_s", "rebuild_engine_s"]
ROW_KEYS = ["shape", "stages", "replicas", "ranks", "micro_batch", "micro_batches", "kill", "victim_slot",
            "victim_stage", "method", "after_step",
            "step_time_s", *[k for k, _ in PHASES], *REBUILD_PARTS, "timeout_reached", "join_latency_s"]
META_KEYS = ["commit", "date", "machine", "protocol"]
#: per replica and step: micro-batches of this many sequences. The default is the smallest
#: pipeline step: on 2 cores a step of 17 processes is mostly scheduling, and the redone step
#: (an ordinary step, not a recovery cost) would otherwise hide what the recovery costs
MICRO_BATCH, MICRO_BATCHES = 1, 2


def protocol(micro_batch: int, micro_batches: int, launcher: str = "mpirun", accelerator: str = "cpu") -> str:
    how = ("mpirun --with-ft ulfm" if launcher == "mpirun" else
           "no launcher (a coordinator and every member started by hand with --join)")
    plane = ("CPU gloo, OMP_NUM_THREADS=1" if accelerator == "cpu" else
             "CUDA NCCL, every member on GPU 0 as its own NCCL host")
    return (f"{how}, S stages x R replicas + 1 spare, tiny LLaMA (8 layers, or S if more), "
            f"{micro_batches} micro-batches of {micro_batch} sequence{'s' if micro_batch > 1 else ''} (64 tokens) "
            f"per replica and step, {plane}, one kill at a time, each spare replaced by a "
            "--join process before the next kill; phases from the metrics writer's recovery_timeline")


PROTOCOL = protocol(MICRO_BATCH, MICRO_BATCHES)


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
            **{k: rec.get(k, float("nan")) for k in REBUILD_PARTS}}


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
            self._wait(lambda: self.job.last_step() and self.job.last_step()["step"] >= 5, "step 5")
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
               "timeout_reached": timeouts_in(self.logs) > timeouts_before, "join_latency_s": join_latency}
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


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key in ("stages", "replicas", "ranks", "kill", "victim_slot", "victim_stage", "after_step"):
            r[key] = int(r[key])
        for key, before in (("micro_batch", 4), ("micro_batches", 4)):  # rows from before the option: 4 x 4
            r[key] = int(r[key]) if r.get(key) not in ("", None) else before
        for key in ["step_time_s", *[k for k, _ in PHASES], *REBUILD_PARTS, "join_latency_s"]:
            r[key] = float(r[key]) if r.get(key) not in ("", "None", None) else float("nan")
        r["timeout_reached"] = r["timeout_reached"] == "True"
    return rows


def write_rows(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=ROW_KEYS + META_KEYS)
        w.writeheader()
        for r in sorted(rows, key=lambda r: (r["ranks"], r["stages"], r["kill"])):
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k in w.fieldnames})


def summary(rows: list[dict]) -> list[dict]:
    """Per shape: kills, medians (min-max) of each phase, kills without a timeout, under 1 s."""
    out = []
    for shape in sorted({r["shape"] for r in rows}, key=lambda s: next(r["ranks"] for r in rows if r["shape"] == s)):
        mine = [r for r in rows if r["shape"] == shape]
        entry = {"shape": shape, "ranks": mine[0]["ranks"], "kills": len(mine),
                 "methods": "/".join(sorted({r["method"] for r in mine})),
                 "workload": "/".join(sorted({f"{r['micro_batches']} x {r['micro_batch']}" for r in mine})),
                 "no_timeout": sum(not r["timeout_reached"] for r in mine),
                 "under_1s": sum(r["total_s"] < 1.0 for r in mine),
                 "step_time_s": statistics.median(r["step_time_s"] for r in mine)}
        for key, _ in PHASES:
            vals = [r[key] for r in mine]
            entry[key] = (statistics.median(vals), min(vals), max(vals))
        for key in [*REBUILD_PARTS, "join_latency_s"]:
            known = [r[key] for r in mine if r[key] == r[key]]
            entry[key] = statistics.median(known) if known else float("nan")
        out.append(entry)
    return out


#: what the runs of 2026-12-02 showed beyond the tables (kept with them; re-read when re-measuring)
NOTES = """## Notes (runs of 2026-12-02, 16:51-17:08 UTC, commit 6e1a7fa)

- No kill reached a timeout (gloo's, the data plane's or the agreement's): before the waits were made
  interruptible (`ds_checkfree.elastic.plane_waits`), 2 of 3 kills at 4x3/4x4 waited out the 30 s data-plane
  timeout (issue #29).
- Workload: 2 micro-batches of one sequence per replica and step, the smallest pipeline step. The
  earlier runs of this benchmark (commit e7488b8's recovery_scaling.csv) used 4 micro-batches of 4
  sequences: step 0.58 s at 4x3 and 0.78 s at 4x4, recoveries 1.40 / 1.66 s median, none under 1 s;
  that redone step alone took most of the second. The redone step is an ordinary step (the data
  resumes at the interrupted one), not a recovery cost.
- The same VM ran these shapes faster than in the runs of 14:18-15:32 UTC (commit 7fc2a32's file: step
  0.316 s and recovery 0.839 s median at 4x4, against 0.229 s and 0.575 s here): the VM's speed varies
  between sessions by about that much; compare shapes within one file, not across files.
- On 2 cores every member's CPU work shares the same cores, so the step time itself grows with the
  process count, and so does every phase in which every member works (detection: the error surfaces at
  the member's next communication; teardown; re-materialisation). Their ratios to the step time stay
  roughly flat or fall.
- Forming the groups (the engine rebuild's `new_group` calls, last table) costs each member 1-5 ms of CPU at
  every size; the rest of its wall time is waiting: a gloo group forms once its last member called
  `new_group`, and members arrive as each finishes its own teardown, agreement and module build. With one
  replica a member's only multi-member groups are its pipe (the default group, formed in the data-plane
  phase) and its neighbour pairs: 2-23 ms up to 33 ranks. With R replicas each member also forms its
  stage's data-parallel group of R members and waits for the last of them: a fifth of a step time from 9
  to 17 ranks (25-41 ms), 0.155 s (0.28 of a step) at 4x8. That wait grows with R by construction (the
  slowest of R arrivals) and with contention; only keeping groups across a recovery would remove it
  (issue #29, not done: `ds_checkfree/elastic/data_plane.py` says what each backend allows and why
  groups without the lost slot are usually mid-operation when a kill lands mid-step).
- Where that time goes at 4x8 (`group_forming_trace_4x8.csv`: one traced recovery, every rank's `new_group`
  calls): members start forming groups 0-98 ms apart (the spread the data-plane phase leaves them with),
  wait in their pipe group (39 ms median per member) and in their data-parallel group of 8 (63 ms), then form
  their own group of one (DeepSpeed's model-parallel group with one rank per stage; 33 ms, round trips to the
  store) among 31 calls for other ranks' groups of one (43 ms in all: time the process was not scheduled);
  11 ms of CPU. Forming each group by its members alone (torch's `use_local_synchronization`, the other ranks
  skipping the call) made no difference that 3 kills per side could show (`group_forming_ab.csv`: 65 / 148 ms
  at 4x4 / 4x8 against 49 / 196 ms, on a slower stretch of the VM than the table above): not used.
- `TORCH_GLOO_LAZY_INIT=1` (connect each pair on first use, so a group forms without waiting for its
  members), A/B on this VM on fa557b8's code, 3 kills per shape and side (`gloo_lazy_init_ab.csv`): forming the groups 4 / 18 ms (4x1 /
  4x4) against 5 / 33 ms, the data plane 1 / 7 ms against 9 / 39 ms; but the connections then form in the
  redone step (0.301 s against 0.212 s at 4x4) and the recovery was no faster (0.149 / 0.758 s against
  0.160 / 0.616 s median). Not used.
- At 33 ranks the data plane took 5.2 s in the first runs (commit 8160dac, both shapes): torch's TCPStore
  client handshake stalls exactly 5.0 s when ~30 clients connect at once (reproduced without this project:
  32 processes forming gloo groups through fresh TCPStore clients under torchrun, 5.0-5.3 s stalls in most
  generations at 32, rarely at 16, with either store server and with connects staggered by 10 ms; plain
  Python sockets on the same VM, gVisor, show no such stall). Each member now opens the next generation's
  client while the current one trains, spread over its first 8 steps (`ds_checkfree.elastic.store_clients`):
  the data plane takes 0.15-0.2 s there. A first try that opened all clients at the same step stalled in
  the background and, with a kill landing in that window, delayed detection by ~3 s in 2 of 8 kills;
  spreading them removed it.
- 33 ranks stay over 1 s (4x8 1.66 s, 32x1 1.11 s median): every phase grows with the 33 processes'
  contention for two cores (the step alone is 0.38-0.56 s).
"""


def markdown(rows: list[dict]) -> str:
    meta = rows[-1] if rows else {}
    lines = ["# Recovery phases against job size (`benchmarks/recovery_scaling.py`)", "",
             f"Commit {meta.get('commit', '?')}, {meta.get('date', '?')}; machine: {meta.get('machine', '?')}.", "",
             f"Protocol: {meta.get('protocol', PROTOCOL)}. Seconds; median [min-max] over the kills of each shape.",
             "", "| shape | ranks | micro-batches x sequences | kills | method | step time | " +
             " | ".join(l for _, l in PHASES) + " | no timeout | total < 1 s | join latency |",
             "|" + "---|" * (len(PHASES) + 9)]
    for e in summary(rows):
        cells = [f"{e[k][0]:.3f} [{e[k][1]:.3f}-{e[k][2]:.3f}]" for k, _ in PHASES]
        lines.append(f"| {e['shape']} | {e['ranks']} | {e['workload']} | {e['kills']} | {e['methods']} | "
                     f"{e['step_time_s']:.3f} | "
                     + " | ".join(cells) + f" | {e['no_timeout']}/{e['kills']} | {e['under_1s']}/{e['kills']} | "
                     f"{e['join_latency_s']:.1f} |")
    lines += ["", "Each phase's median divided by the shape's median step time: on 2 cores every member's CPU "
              "work shares the same cores, so a phase whose ratio stays flat grows only with the step (CPU "
              "contention); a ratio that grows is growth of the protocol itself.", "",
              "| shape | ranks | " + " | ".join(l for k, l in PHASES if k != "total_s")
              + " | engine rebuild: forming the groups |",
              "|" + "---|" * (len(PHASES) + 2)]
    for e in summary(rows):
        lines.append(f"| {e['shape']} | {e['ranks']} | " + " | ".join(
            f"{e[k][0] / e['step_time_s']:.2f}" for k, _ in PHASES if k != "total_s")
            + f" | {e['rebuild_groups_s'] / e['step_time_s']:.2f} |")
    lines += ["", "The engine rebuild's parts (median s; blank: not recorded by that run): the pipeline module "
              "with DeepSpeed's process groups (each set of members formed once, by its own members), and "
              "DeepSpeed's engine (config, optimizer; no start-up weight broadcast in a rebuild).", "",
              "| shape | ranks | engine rebuild | module + its groups | of which forming the groups "
              "| CPU time in forming them | DeepSpeed engine |",
              "|---|---|---|---|---|---|---|"]
    for e in summary(rows):
        parts = " | ".join("" if e[k] != e[k] else f"{e[k]:.3f}" for k in REBUILD_PARTS)
        lines.append(f"| {e['shape']} | {e['ranks']} | {e['engine_rebuild_s'][0]:.3f} | {parts} |")
    return "\n".join(lines) + "\n\n" + NOTES


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    entries = summary(rows)
    stages = {e["shape"]: int(e["shape"].split("x")[0]) for e in entries}
    replicas = {e["shape"]: int(e["shape"].split("x")[1]) for e in entries}
    series = [(f"{s} stages, R replicas", [e for e in entries if stages[e["shape"]] == s])
              for s in sorted(set(stages.values()))] + \
             [(f"S stages, {r} replica{'s' if r > 1 else ''}", [e for e in entries if replicas[e["shape"]] == r])
              for r in sorted(set(replicas.values()))]
    series = [(name, es) for name, es in series if len(es) >= 2] or [("median", entries)]
    # the phases, then the engine rebuild's group forming on its own (the part issue #29 asks to stay flat)
    panels = [*PHASES, ("rebuild_groups_s", "engine rebuild: forming the groups")]
    fig, axes = plt.subplots(3, 3, figsize=(14, 10), sharex=True)
    for ax, (key, label) in zip(axes.flat, panels):
        for r in rows:
            ax.plot(r["ranks"], r[key], "o", color="0.7", ms=4)
        for i, (name, es) in enumerate(series):
            med = [e[key][0] if isinstance(e[key], tuple) else e[key] for e in es]
            ax.plot([e["ranks"] for e in es], med, "-o", color=f"C{i}", label=f"median, {name}")
            if key == "rebuild_groups_s":
                cpu = [e["rebuild_groups_cpu_s"] for e in es]
                ax.plot([e["ranks"] for e in es], cpu, ":", color=f"C{i}", label=f"CPU time in them, {name}")
            if key == "redo_step_s":
                ax.plot([e["ranks"] for e in es], [e["step_time_s"] for e in es], "--", color=f"C{i}",
                        label=f"step time, {name}")
        if key in ("detection_s", "redo_step_s", "rebuild_groups_s"):
            ax.legend(fontsize=7)
        ax.set_title(label)
        ax.set_xscale("log", base=2)
        ax.set_xticks([e["ranks"] for e in entries], [str(e["ranks"]) for e in entries])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("ranks (stages x replicas + 1 spare)")
    for ax in axes[:, 0]:
        ax.set_ylabel("seconds")
    fig.suptitle("Recovery phases against job size (kill -> next completed step; grey: each kill)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(rows: list[dict], csv_path: str) -> None:
    write_rows(csv_path, rows)
    base = os.path.splitext(csv_path)[0]
    Path(base + ".md").write_text(markdown(rows))
    plot(rows, base + ".png")
    print(markdown(rows))
    print(f"wrote {csv_path}, {base}.md, {base}.png")


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
