"""Kill campaign (issue #12): real process deaths at random moments, under ``mpirun --with-ft ulfm``.

Each run is one real job (4 stages, tiny model, ``--steps`` steps, eval off, CPU/gloo,
``OMP_NUM_THREADS=1``) hit by one scenario drawn at random (balanced: the selected
scenarios are repeated to cover ``--runs`` and shuffled with ``--seed``); the stage(s), the
step and the moment inside the step are drawn from a per-run seed:

- ``one_kill``: one stage SIGKILLed mid-run, 1 spare (CheckFree: stage 1 or 2; CheckFree+:
  any stage).
- ``two_at_once``: two non-adjacent stages SIGKILLed together, CheckFree+, 2 spares.
- ``second_kill``: a second SIGKILL 0.3 s after the first (during the recovery), CheckFree+,
  2 spares; the second victim is a stage not adjacent to the first, or the spare (rank 4)
  that is taking the first victim's place.
- ``startup_kill``: one stage SIGKILLed 1-8 s after its process appeared (before step 1),
  1 spare, ``startup_wait_s`` 15.
- ``sigstop``: one stage SIGSTOPped mid-run (a hung node), 1 spare, ``heartbeat_timeout_s``
  3; SIGCONT once the job recovered (or ended).
- ``join``: no spare, ``join_wait_s`` 60: a stage SIGKILLed, and 2 s later
  ``python launch/train.py ... --join 127.0.0.1:PORT`` (PORT from ``out/coordinator-*.json``).

Mid-run kills land after step k (uniform in [5, 25]) plus a delay drawn uniformly in
[0, that step's time): forward, backward or the optimizer step. Every run has a hard
timeout (``--timeout_s``): past it the run is a HANG (every rank's stacks are dumped with
SIGUSR1 into the job log, then the job's process group, the joiner and the coordinator
are killed by pid).

Outcome: ``survived`` (rc 0, every step 1..N in metrics.jsonl, the joiner exited 0),
``clean_stop`` (non-zero rc with an ``unrecoverable`` event or a ``fatal:`` line, and no
Traceback), ``hang``, else ``unclean`` (anything else, e.g. a Traceback).
Recovery time: the kill (first kill; the SIGSTOP) -> ``next_step_done_at`` of the first
``recovery_timeline`` event after the last kill. Join latency: the joiner's start -> that
event. Goal: 0 hangs, every recovery under heartbeat timeout + 2 step times (median step
time of the run); join runs are reported by their join latency (their recovery waits for a
process to be started 2 s later and to import torch/DeepSpeed, which the goal's bound does
not cover).

    flock /tmp/heavy.lock .venv/bin/python -m benchmarks.kill_campaign --runs 20

Writes ``benchmarks/results/kill_campaign.csv`` (one row per run) and ``kill_campaign.md``
(table + protocol, ``benchmarks/kill_campaign_report.py``); each run's log.txt, joiner log, metrics.jsonl and coordinator log stay
in the work directory it prints.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._runs import RESULTS, base_config
from benchmarks.kill_campaign_report import report
from ds_checkfree.elastic.membership.client import EXIT_EVICTED
from ds_checkfree.testing import (REPO, Job, events_of, last_step, mpirun_cmd, read_metrics, standalone_env,
                                  steps_of, train_args, wait_gone)
from ds_checkfree.testing.procs import command_line, kill_group

NUM_STAGES = 4
SCENARIOS = ("one_kill", "two_at_once", "second_kill", "startup_kill", "sigstop", "join", "coordinator_kill")
DESCRIBE = {
    "one_kill": "one stage SIGKILLed mid-run, 1 spare",
    "two_at_once": "two non-adjacent stages SIGKILLed at once, CheckFree+, 2 spares",
    "second_kill": "a second SIGKILL 0.3 s after the first, CheckFree+, 2 spares",
    "startup_kill": "one stage SIGKILLed before step 1, 1 spare, startup_wait_s 15",
    "sigstop": "one stage SIGSTOPped mid-run, 1 spare, heartbeat_timeout_s 3",
    "join": "no spare: a stage SIGKILLed, a process joins 2 s later (join_wait_s 60)",
    "coordinator_kill": "the coordinator SIGKILLed mid-run, 1 spare; in half the runs a stage too, 8 steps later",
}
NON_ADJACENT = [(0, 2), (1, 3), (0, 3)]
DEFAULT_HB_TIMEOUT = 10.0


class Deadline(Exception):
    """The run's hard timeout passed."""


# --------------------------------------------------------------------------- one run
class Run:
    def __init__(self, work: Path, index: int, seed: int, scenario: str, steps: int, timeout_s: float):
        self.dir = work / f"run{index:02d}_{scenario}"
        self.dir.mkdir(parents=True)
        self.out = self.dir / "out"
        self.index, self.seed, self.scenario, self.steps = index, seed, scenario, steps
        self.rng = random.Random(seed)
        self.timeout_s = timeout_s
        self.job = self.proc = self.joiner = None
        self.joiner_started_at = None
        self.row = {"run": index, "scenario": scenario, "seed": seed}

    # -- plumbing (the job itself: ds_checkfree.testing) -----------------------------------
    def launch(self, mode: str, spares: int, victims: str, **checkfree) -> None:
        """Start the job (``victims``: who the scenario will hit, for the report)."""
        cfg = base_config(mode, spares=spares, **checkfree)
        self.cfg_path = self.dir / "ds.json"
        self.cfg_path.write_text(json.dumps(cfg))
        self.hb_timeout = float(cfg["checkfree"].get("heartbeat_timeout_s", DEFAULT_HB_TIMEOUT))
        self.row.update(mode=mode, spares=spares, victims=victims)
        cmd = mpirun_cmd(NUM_STAGES + spares, fault_tolerant=True) + self.train_args()
        if spares == 0:
            cmd.append("--fault_tolerant")
        self.job = Job(cmd, self.out, self.dir / "log.txt")
        self.proc, self.started_at = self.job.proc, self.job.started_at
        self.deadline = self.started_at + self.timeout_s

    def train_args(self) -> list[str]:
        return train_args(self.cfg_path, self.out, self.steps)

    def check_deadline(self) -> None:
        if time.time() > self.deadline:
            raise Deadline()

    def rank_pids(self) -> dict[int, int]:
        """MPI rank -> PID of this run's training processes."""
        return self.job.rank_pids()

    def wait_until(self, predicate, poll: float = 0.02):
        while True:
            value = predicate()
            if value:
                return value
            self.check_deadline()
            time.sleep(poll)

    def last_step(self) -> dict | None:
        return last_step(read_metrics(self.out, missing_ok=True))

    def wait_for_step(self, step: int) -> dict | None:
        """The record of step >= ``step``; None if the job ended first."""
        try:
            return self.job.wait_for_step(step, max(0.0, self.deadline - time.time()), poll=0.02)
        except TimeoutError:
            raise Deadline() from None

    def coordinator_info(self) -> dict | None:
        found = sorted(self.out.glob("coordinator-*.json")) if self.out.exists() else []
        for path in found:
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError):
                pass
        return None

    def kill_moment(self, lo: int = 5, hi: int = 25):
        """Wait for step k, then a uniform delay within a step time; returns (k, delay) or None."""
        k = self.rng.randint(lo, min(hi, self.steps - 10))
        frac = self.rng.random()
        rec = self.wait_for_step(k)
        if rec is None:
            return None
        delay = frac * rec["step_time_s"]
        time.sleep(delay)
        self.row.update(kill_step=rec["step"], kill_moment_s=round(delay, 4), kill_moment_frac=round(frac, 3))
        return rec["step"], delay

    def signal_rank(self, rank: int, sig=signal.SIGKILL) -> float:
        self.job.signal_rank(rank, sig)
        return time.time()

    def start_joiner(self, address: str) -> None:
        self.joiner_log = open(self.dir / "joiner.txt", "w")
        self.joiner_started_at = time.time()
        self.joiner = subprocess.Popen([sys.executable, *self.train_args(), "--join", address], cwd=REPO,
                                       env=standalone_env(), stdout=self.joiner_log, stderr=subprocess.STDOUT,
                                       start_new_session=True)

    def wait_job(self) -> tuple[int, int | None]:
        self.wait_until(lambda: self.proc.poll() is not None, poll=0.1)
        rc = self.job.wait(timeout=None)
        jrc = None
        if self.joiner is not None:
            self.wait_until(lambda: self.joiner.poll() is not None, poll=0.1)
            jrc = self.joiner.returncode
        return rc, jrc

    def kill_everything(self, dump_stacks: bool) -> None:
        """Hang: stacks of every process of the run into its log (SIGCONT, SIGUSR1), then SIGKILL:
        the job's group, the joiner's, anything else with the run's output dir in its command line."""
        if self.job is not None:
            self.job.stop(dump_stacks=dump_stacks)
        if self.joiner is not None and self.joiner.poll() is None:
            kill_group(self.joiner)

    def finish_coordinator(self, grace_s: float = 15.0) -> None:
        """The coordinator leaves by itself once every member is gone; kill it (by pid) if it lingers."""
        info = self.coordinator_info()
        if not info or not info.get("pid"):
            return
        pid = info["pid"]
        if not wait_gone(pid, grace_s, poll=0.2) and \
                "ds_checkfree.elastic.membership.coordinator" in command_line(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            self.row["note"] = (self.row.get("note", "") + f" coordinator still up {grace_s:g} s after "
                                "the job; killed").strip()

    # -- scenarios -----------------------------------------------------------------------
    def draw_single(self) -> tuple[str, int]:
        mode = self.rng.choice(["checkfree", "checkfree_plus"])
        victim = self.rng.choice([1, 2] if mode == "checkfree" else [0, 1, 2, 3])
        return mode, victim

    def scenario_one_kill(self):
        mode, victim = self.draw_single()
        self.launch(mode, 1, str(victim))
        if self.kill_moment() is None:
            return
        self.kills = [self.signal_rank(victim)]

    def scenario_two_at_once(self):
        a, b = self.rng.choice(NON_ADJACENT)
        self.launch("checkfree_plus", 2, f"{a}+{b}")
        if self.kill_moment() is None:
            return
        pids = self.rank_pids()
        os.kill(pids[a], signal.SIGKILL)
        os.kill(pids[b], signal.SIGKILL)
        self.kills = [time.time()]

    def scenario_second_kill(self):
        first = self.rng.randrange(NUM_STAGES)
        options = [s for s in range(NUM_STAGES) if abs(s - first) > 1] + ["spare4"]
        second = self.rng.choice(options)
        self.launch("checkfree_plus", 2, f"{first} then {second}")
        if self.kill_moment() is None:
            return
        pids = self.rank_pids()
        os.kill(pids[first], signal.SIGKILL)
        t0 = time.time()
        time.sleep(max(0.0, 0.3 - (time.time() - t0)))
        os.kill(pids[4 if second == "spare4" else second], signal.SIGKILL)
        self.kills = [t0, time.time()]

    def scenario_startup_kill(self):
        victim = self.rng.randrange(NUM_STAGES)
        delay = self.rng.uniform(1.0, 8.0)
        self.launch("checkfree", 1, str(victim), startup_wait_s=15.0)
        appeared = self.wait_until(lambda: self.rank_pids().get(victim), poll=0.05)
        if appeared is None:
            return
        seen_at = time.time()
        time.sleep(max(0.0, seen_at + delay - time.time()))
        last = self.last_step()
        coordinator_up = self.coordinator_info() is not None
        self.kills = [self.signal_rank(victim)]
        self.row.update(kill_step=last["step"] if last else 0, kill_moment_s=round(self.kills[0] - self.started_at, 3),
                        note=f"killed {delay:.2f} s after its process appeared, "
                             f"{self.kills[0] - self.started_at:.2f} s after launch; coordinator "
                             f"{'announced' if coordinator_up else 'not yet announced'}")

    def scenario_sigstop(self):
        mode, victim = self.draw_single()
        self.launch(mode, 1, str(victim), heartbeat_timeout_s=3.0)
        if self.kill_moment() is None:
            return
        self.stopped_pid = self.rank_pids()[victim]
        os.kill(self.stopped_pid, signal.SIGSTOP)
        self.kills = [time.time()]

        def recovered_or_over():
            if self.proc.poll() is not None:
                return True
            return any(t["next_step_done_at"] > self.kills[0]
                       for t in events_of(read_metrics(self.out, missing_ok=True), "recovery_timeline"))
        try:
            self.wait_until(recovered_or_over, poll=0.05)
        finally:
            os.kill(self.stopped_pid, signal.SIGCONT)
        cont_at = time.time()
        # does the evicted process leave by itself once continued?
        gone = wait_gone(self.stopped_pid, max(0.0, min(self.deadline, cont_at + 30) - time.time()), poll=0.1)
        self.row["note"] = (f"stopped process {'exited' if gone else 'still alive'} "
                            f"{time.time() - cont_at:.1f} s after SIGCONT")

    def scenario_join(self):
        mode, victim = self.draw_single()
        self.launch(mode, 0, str(victim), join_wait_s=60.0)
        info = self.wait_until(lambda: self.coordinator_info() or (self.proc.poll() is not None and {"ended": 1}),
                               poll=0.1)
        if "port" not in info:
            return
        address = f"127.0.0.1:{info['port']}"
        if self.kill_moment() is None:
            return
        self.kills = [self.signal_rank(victim)]
        time.sleep(2.0)
        self.start_joiner(address)

    def scenario_coordinator_kill(self):
        """Issue #26: the coordinator alone SIGKILLed (a standby takes over, no stage is lost), or
        followed 8 steps later by a stage (recovered through the standby). The recovery of the
        stage's run is timed from the stage's kill; the failover's own time is in the note."""
        mode, victim = self.draw_single()
        then_stage = self.rng.random() < 0.5
        self.launch(mode, 1, f"coordinator then {victim}" if then_stage else "coordinator")
        moment = self.kill_moment(hi=15)
        if moment is None:
            return
        os.kill(self.coordinator_info()["pid"], signal.SIGKILL)
        self.kills = [time.time()]
        if then_stage and self.wait_for_step(moment[0] + 8) is not None:
            self.kills = [self.signal_rank(victim)]
            self.row["note"] = f"coordinator killed after step {moment[0]}, stage {victim} 8 steps later"
        self.wait_until(lambda: self.proc.poll() is not None, poll=0.1)
        rejoined = [float(s) for s in re.findall(r"re-registered with the coordinator at \S+ ([0-9.]+) s after",
                                                 self.logs())]
        self.row["note"] = (self.row.get("note", "") + f"; failover: {len(rejoined)} members re-registered, "
                            f"the last {max(rejoined, default=float('nan')):.1f} s after losing the coordinator"
                            ).strip("; ")

    # -- the whole run -------------------------------------------------------------------
    def execute(self) -> dict:
        self.kills, self.stopped_pid = [], None
        outcome = None
        try:
            getattr(self, f"scenario_{self.scenario}")()
            rc, jrc = self.wait_job()
        except Deadline:
            outcome, rc, jrc = "hang", None, None
            self.kill_everything(dump_stacks=True)
        except Exception as err:  # noqa: BLE001 - a harness problem: keep the campaign going, report it
            outcome, rc, jrc = "harness_error", None, None
            self.row["note"] = f"harness: {type(err).__name__}: {err}"
            self.kill_everything(dump_stacks=False)
        self.finish_coordinator()
        if self.joiner is not None:
            self.joiner_log.close()
        self.row.update(rc=rc, joiner_rc=jrc, wall_s=round(time.time() - self.started_at, 1))
        self.classify(outcome, rc, jrc)
        return self.row

    def logs(self) -> str:
        text = (self.dir / "log.txt").read_text(errors="replace")
        if (self.dir / "joiner.txt").exists():
            text += "\n" + (self.dir / "joiner.txt").read_text(errors="replace")
        return text

    def classify(self, outcome, rc, jrc) -> None:
        try:
            records, damaged = read_metrics(self.out, missing_ok=True), ""
        except ValueError as err:  # a broken line before the last: a finding, not a harness crash
            records, damaged = [], str(err)
        steps = steps_of(records)
        done = sorted({s["step"] for s in steps})
        log = self.logs()
        fatal = re.findall(r"fatal: (.*)", log)
        unrec = events_of(records, "unrecoverable")
        if outcome is None:
            all_steps = done == list(range(1, self.steps + 1))
            if rc == 0 and all_steps and jrc in (None, 0):
                outcome = "survived"
            elif (rc == EXIT_EVICTED and all_steps and jrc in (None, 0) and "Traceback" not in log
                  and "evicted from the job by the coordinator" in log):
                # trained to the end; mpirun passes on the exit status 4 of the process that was
                # evicted while stopped and left when continued (membership.client.EXIT_EVICTED)
                outcome = "survived_rc4"
            elif rc != 0 and (unrec or fatal) and "Traceback" not in log:
                outcome = "clean_stop"
            else:
                outcome = "unclean"
        reason = ""
        if damaged:
            outcome, reason = ("unclean" if outcome not in ("hang", "harness_error") else outcome), damaged
        elif unrec:
            reason = unrec[-1].get("reason", "")
        elif fatal:
            reason = fatal[0]
        elif outcome == "unclean" and rc == 0 and done != list(range(1, self.steps + 1)):
            missing = sorted(set(range(1, self.steps + 1)) - set(done))
            reason = f"rc 0 but step(s) {missing[:10]} missing from metrics.jsonl"
        elif outcome in ("unclean",) and "Traceback" in log:
            tail = log[log.rfind("Traceback"):].strip().splitlines()
            reason = "Traceback: " + (tail[-1] if tail else "")
        self.row.update(outcome=outcome, reason=reason[:300], steps_done=len(done))
        times = [s["step_time_s"] for s in steps if s["step"] > 3]
        self.row["step_time_s"] = round(statistics.median(times), 4) if times else None
        self.row["hb_timeout_s"] = self.hb_timeout
        self.row["kill_at_s"] = round(self.kills[0] - self.started_at, 3) if self.kills else None
        timelines = events_of(records, "recovery_timeline")
        self.row["recovery_rounds"] = len(timelines)
        if self.kills and self.scenario != "startup_kill":
            after = sorted(t["next_step_done_at"] for t in timelines if t["next_step_done_at"] > self.kills[-1])
            if after:
                self.row["recovery_s"] = round(after[0] - self.kills[0], 3)
                if self.joiner_started_at is not None:
                    self.row["join_latency_s"] = round(after[0] - self.joiner_started_at, 3)
        if self.scenario == "startup_kill" and self.kills:
            firsts = [s["time"] for s in steps if s["step"] == 1]
            if firsts:
                self.row["note"] = (self.row.get("note", "") + f"; step 1 done {firsts[0] - self.kills[0]:.1f} s "
                                    "after the kill").strip("; ")
        self.row["log_dir"] = str(self.dir)



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="campaign seed (scenario order, victims, moments)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of {SCENARIOS}")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--timeout_s", type=float, default=180.0, help="hard limit per run; past it: a hang")
    p.add_argument("--out", default=os.path.join(RESULTS, "kill_campaign.csv"))
    p.add_argument("--code_note", default="", help="which code ran (e.g. a commit), for the .md")
    p.add_argument("--work", default=None, help="where each run's logs go (default: a new temp dir)")
    args = p.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in scenarios if s not in SCENARIOS]
    if bad or not scenarios:
        p.error(f"--scenarios: unknown {bad}; choose among {SCENARIOS}")
    if args.steps < 30:
        p.error("--steps: at least 30 (kills land after step 5..25)")
    rng = random.Random(args.seed)
    order = (scenarios * (args.runs // len(scenarios) + 1))[:args.runs]
    rng.shuffle(order)
    run_seeds = [rng.randrange(2 ** 31) for _ in order]
    work = Path(args.work or tempfile.mkdtemp(prefix="kill_campaign_"))
    work.mkdir(parents=True, exist_ok=True)
    args.work = str(work)
    print(f"kill campaign: {args.runs} runs, seed {args.seed}, scenarios {scenarios}, {args.steps} steps, "
          f"timeout {args.timeout_s:g} s; work dir {work}", flush=True)
    t0 = time.time()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    rows = []
    for i, (scenario, seed) in enumerate(zip(order, run_seeds)):
        row = Run(work, i, seed, scenario, args.steps, args.timeout_s).execute()
        rows.append(row)
        rec = f"{row['recovery_s']:.2f} s" if row.get("recovery_s") is not None else "-"
        join = f", join latency {row['join_latency_s']:.2f} s" if row.get("join_latency_s") is not None else ""
        print(f"[{i + 1}/{args.runs}] {scenario} mode={row.get('mode')} victims={row.get('victims')} "
              f"kill after step {row.get('kill_step')} +{row.get('kill_moment_s')} s: {row['outcome']} "
              f"(rc {row['rc']}{'' if row.get('joiner_rc') is None else ', joiner rc ' + str(row['joiner_rc'])}, "
              f"{row['steps_done']} steps), recovery {rec}{join}, {row['wall_s']} s"
              f"{'; ' + row['reason'][:160] if row.get('reason') and row['outcome'] != 'survived' else ''}"
              f"{'; ' + row['note'] if row.get('note') else ''}", flush=True)
        ok = report(args, scenarios, rows, t0, started, final=i + 1 == len(order), describe=DESCRIBE)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
