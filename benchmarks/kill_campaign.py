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

    flock /tmp/heavy.lock .venv/bin/python benchmarks/kill_campaign.py --runs 20

Writes ``benchmarks/results/kill_campaign.csv`` (one row per run) and ``kill_campaign.md``
(table + protocol); each run's log.txt, joiner log, metrics.jsonl and coordinator log stay
in the work directory it prints.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _runs import RESULTS, ROOT, base_config  # noqa: E402

BIN = Path(sys.executable).parent
TRAIN = os.path.join(ROOT, "launch", "train.py")
NUM_STAGES = 4
SCENARIOS = ("one_kill", "two_at_once", "second_kill", "startup_kill", "sigstop", "join")
DESCRIBE = {
    "one_kill": "one stage SIGKILLed mid-run, 1 spare",
    "two_at_once": "two non-adjacent stages SIGKILLed at once, CheckFree+, 2 spares",
    "second_kill": "a second SIGKILL 0.3 s after the first, CheckFree+, 2 spares",
    "startup_kill": "one stage SIGKILLed before step 1, 1 spare, startup_wait_s 15",
    "sigstop": "one stage SIGSTOPped mid-run, 1 spare, heartbeat_timeout_s 3",
    "join": "no spare: a stage SIGKILLed, a process joins 2 s later (join_wait_s 60)",
}
NON_ADJACENT = [(0, 2), (1, 3), (0, 3)]
DEFAULT_HB_TIMEOUT = 10.0
EXIT_EVICTED = 4  # ds_checkfree.elastic.membership.client.EXIT_EVICTED (mirrored: the harness imports no ds_checkfree)


def job_env() -> dict:
    env = dict(os.environ)
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def read_metrics(out: Path) -> list[dict]:
    try:
        text = (out / "metrics.jsonl").read_text()
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return records


def steps_of(records):
    return [r for r in records if "loss" in r and "event" not in r]


def events_of(records, name):
    return [r for r in records if r.get("event") == name]


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
        self.proc = self.joiner = None
        self.joiner_started_at = None
        self.row = {"run": index, "scenario": scenario, "seed": seed}

    # -- plumbing ------------------------------------------------------------------------
    def launch(self, mode: str, spares: int, **checkfree) -> None:
        cfg = base_config(mode, spares=spares, **checkfree)
        self.cfg_path = self.dir / "ds.json"
        self.cfg_path.write_text(json.dumps(cfg))
        self.hb_timeout = float(cfg["checkfree"].get("heartbeat_timeout_s", DEFAULT_HB_TIMEOUT))
        self.row.update(mode=mode, spares=spares)
        cmd = [str(BIN / "mpirun"), "--with-ft", "ulfm", "--oversubscribe", "--map-by", "slot", "--bind-to", "none",
               "-n", str(NUM_STAGES + spares), "-x", "OMP_NUM_THREADS", "-x", "DS_ACCELERATOR", "-x", "PYTHONPATH",
               "-x", "PYTHONUNBUFFERED", sys.executable, TRAIN, *self.train_args()]
        if spares == 0:
            cmd.append("--fault_tolerant")
        self.log_file = open(self.dir / "log.txt", "w")
        self.started_at = time.time()
        self.deadline = self.started_at + self.timeout_s
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=job_env(), stdout=self.log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def train_args(self) -> list[str]:
        return ["--deepspeed_config", str(self.cfg_path), "--model", "tiny", "--steps", str(self.steps),
                "--eval_every", "0", "--output_dir", str(self.out)]

    def check_deadline(self) -> None:
        if time.time() > self.deadline:
            raise Deadline()

    def rank_pids(self) -> dict[int, int]:
        """MPI rank -> PID of this run's training processes (through /proc)."""
        pids = {}
        key = str(self.out).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if key not in (entry / "cmdline").read_bytes().split(b"\0"):
                    continue
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for var in env:
                if var.startswith(b"OMPI_COMM_WORLD_RANK="):
                    pids[int(var.split(b"=")[1])] = int(entry.name)
        return pids

    def all_pids(self) -> list[int]:
        """Every live process of this run: ranks, joiner, anything with the output dir in its command line."""
        key = str(self.out).encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if key in (entry / "cmdline").read_bytes():
                        found.append(int(entry.name))
                except OSError:
                    pass
        return found

    def wait_until(self, predicate, poll: float = 0.02):
        while True:
            value = predicate()
            if value:
                return value
            self.check_deadline()
            time.sleep(poll)

    def last_step(self) -> dict | None:
        steps = steps_of(read_metrics(self.out))
        return max(steps, key=lambda s: s["step"]) if steps else None

    def wait_for_step(self, step: int) -> dict | None:
        """The record of step >= ``step``; None if the job ended first."""
        def seen():
            if self.proc.poll() is not None:
                return "ended"
            last = self.last_step()
            return last if last is not None and last["step"] >= step else None
        got = self.wait_until(seen)
        return None if got == "ended" else got

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
        pid = self.rank_pids().get(rank)
        if pid is None:
            raise RuntimeError(f"rank {rank} not found")
        os.kill(pid, sig)
        return time.time()

    def start_joiner(self, address: str) -> None:
        env = {k: v for k, v in job_env().items() if not k.startswith(("OMPI_", "PMIX_", "PRTE_"))}
        self.joiner_log = open(self.dir / "joiner.txt", "w")
        self.joiner_started_at = time.time()
        self.joiner = subprocess.Popen([sys.executable, TRAIN, *self.train_args(), "--join", address], cwd=ROOT,
                                       env=env, stdout=self.joiner_log, stderr=subprocess.STDOUT,
                                       start_new_session=True)

    def wait_job(self) -> tuple[int, int | None]:
        self.wait_until(lambda: self.proc.poll() is not None, poll=0.1)
        rc = self.proc.returncode
        jrc = None
        if self.joiner is not None:
            self.wait_until(lambda: self.joiner.poll() is not None, poll=0.1)
            jrc = self.joiner.returncode
        return rc, jrc

    def kill_everything(self, dump_stacks: bool) -> None:
        """Hang: stacks of every rank into the log (SIGUSR1; SIGCONT first), then SIGKILL by pid."""
        pids = self.all_pids()
        if dump_stacks:
            for pid in pids:
                for sig in (signal.SIGCONT, signal.SIGUSR1):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            time.sleep(2.0)
        for proc in (self.proc, self.joiner):
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for pid in self.all_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in (self.proc, self.joiner):
            if proc is not None:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass

    def finish_coordinator(self, grace_s: float = 15.0) -> None:
        """The coordinator leaves by itself once every member is gone; kill it (by pid) if it lingers."""
        info = self.coordinator_info()
        if not info or not info.get("pid"):
            return
        pid, deadline = info["pid"], time.time() + grace_s
        while time.time() < deadline and Path(f"/proc/{pid}").exists():
            try:
                if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                    break
            except OSError:
                break
            time.sleep(0.2)
        if Path(f"/proc/{pid}").exists():
            try:
                if "ds_checkfree.elastic.membership.coordinator" in Path(f"/proc/{pid}/cmdline").read_text():
                    os.kill(pid, signal.SIGKILL)
                    self.row["note"] = (self.row.get("note", "") + f" coordinator still up {grace_s:g} s after "
                                        "the job; killed").strip()
            except (OSError, ProcessLookupError):
                pass

    # -- scenarios -----------------------------------------------------------------------
    def draw_single(self) -> tuple[str, int]:
        mode = self.rng.choice(["checkfree", "checkfree_plus"])
        victim = self.rng.choice([1, 2] if mode == "checkfree" else [0, 1, 2, 3])
        return mode, victim

    def scenario_one_kill(self):
        mode, victim = self.draw_single()
        self.launch(mode, 1)
        self.row["victims"] = str(victim)
        if self.kill_moment() is None:
            return
        self.kills = [self.signal_rank(victim)]

    def scenario_two_at_once(self):
        a, b = self.rng.choice(NON_ADJACENT)
        self.launch("checkfree_plus", 2)
        self.row["victims"] = f"{a}+{b}"
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
        self.launch("checkfree_plus", 2)
        self.row["victims"] = f"{first} then {second}"
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
        self.launch("checkfree", 1, startup_wait_s=15.0)
        self.row["victims"] = str(victim)
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
        self.launch(mode, 1, heartbeat_timeout_s=3.0)
        self.row["victims"] = str(victim)
        if self.kill_moment() is None:
            return
        self.stopped_pid = self.rank_pids()[victim]
        os.kill(self.stopped_pid, signal.SIGSTOP)
        self.kills = [time.time()]

        def recovered_or_over():
            if self.proc.poll() is not None:
                return True
            return any(t["next_step_done_at"] > self.kills[0]
                       for t in events_of(read_metrics(self.out), "recovery_timeline"))
        try:
            self.wait_until(recovered_or_over, poll=0.05)
        finally:
            os.kill(self.stopped_pid, signal.SIGCONT)
        cont_at = time.time()
        # does the evicted process leave by itself once continued?
        while time.time() < min(self.deadline, cont_at + 30):
            try:
                if Path(f"/proc/{self.stopped_pid}/stat").read_text().split()[2] == "Z":
                    break
            except OSError:
                break
            time.sleep(0.1)
        gone = not Path(f"/proc/{self.stopped_pid}").exists() or \
            Path(f"/proc/{self.stopped_pid}/stat").read_text().split()[2] == "Z"
        self.row["note"] = (f"stopped process {'exited' if gone else 'still alive'} "
                            f"{time.time() - cont_at:.1f} s after SIGCONT")

    def scenario_join(self):
        mode, victim = self.draw_single()
        self.launch(mode, 0, join_wait_s=60.0)
        self.row["victims"] = str(victim)
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
        self.log_file.close()
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
        records = read_metrics(self.out)
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
        if unrec:
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


# --------------------------------------------------------------------------- report
COLUMNS = ["run", "scenario", "seed", "mode", "spares", "victims", "kill_step", "kill_moment_s", "kill_moment_frac",
           "kill_at_s", "outcome", "reason", "rc", "joiner_rc", "steps_done", "recovery_rounds", "recovery_s",
           "join_latency_s", "step_time_s", "hb_timeout_s", "wall_s", "note", "log_dir"]


def fmt(values, f=statistics.median):
    return f"{f(values):.2f}" if values else "-"


def summary_rows(rows: list[dict], scenarios) -> list[list[str]]:
    table = []
    groups = [(s, [r for r in rows if r["scenario"] == s]) for s in scenarios] + [("overall", rows)]
    for name, rs in groups:
        if not rs:
            continue
        rec = [r["recovery_s"] for r in rs if r.get("recovery_s") is not None]
        join = [r["join_latency_s"] for r in rs if r.get("join_latency_s") is not None]
        count = {o: sum(r["outcome"] == o for r in rs) for o in ("survived", "survived_rc4", "clean_stop", "hang",
                                                                   "unclean", "harness_error")}
        table.append([name if name == "overall" else f"{name}: {DESCRIBE[name]}", str(len(rs)),
                      str(count["survived"]), str(count["survived_rc4"]), str(count["clean_stop"]), str(count["hang"]),
                      str(count["unclean"] + count["harness_error"]), fmt(rec), fmt(rec, max), fmt(join),
                      fmt(join, max)])
    return table


def goal_check(rows: list[dict]) -> tuple[bool, list[str]]:
    lines, ok = [], True
    hangs = [r for r in rows if r["outcome"] == "hang"]
    lines.append(f"hangs: {len(hangs)} (goal 0) -> {'OK' if not hangs else 'FAILED'}")
    ok &= not hangs
    over = []
    checked = 0
    for r in rows:
        if r["scenario"] == "join" or r.get("recovery_s") is None or not r.get("step_time_s"):
            continue
        checked += 1
        bound = r["hb_timeout_s"] + 2 * r["step_time_s"]
        if r["recovery_s"] >= bound:
            over.append(f"run {r['run']} ({r['scenario']}): {r['recovery_s']:.2f} s >= {bound:.2f} s")
    lines.append(f"recoveries under heartbeat timeout + 2 step times: {checked - len(over)} of {checked} "
                 f"-> {'OK' if not over else 'FAILED: ' + '; '.join(over)}")
    ok &= not over
    no_rec = [r for r in rows if r["outcome"] in ("survived", "survived_rc4") and r.get("recovery_s") is None
              and r["scenario"] not in ("startup_kill",)]
    if no_rec:
        lines.append("survived without a measured recovery (kill after the last step?): runs "
                     + ", ".join(str(r["run"]) for r in no_rec))
    return ok, lines


def machine() -> str:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = []
    try:
        import torch
        versions.append(f"torch {torch.__version__}")
    except ImportError:
        pass
    try:
        from importlib.metadata import version
        versions.append(f"deepspeed {version('deepspeed')}")
        versions.append(f"mpi4py {version('mpi4py')}")
    except Exception:  # noqa: BLE001
        pass
    try:
        ompi = subprocess.run([str(BIN / "mpirun"), "--version"], capture_output=True, text=True, timeout=30,
                              env=job_env()).stdout.splitlines()[0]
        versions.append(ompi)
    except Exception:  # noqa: BLE001
        pass
    return (f"{platform.node()}: {cpu}, {len(os.sched_getaffinity(0))} cores usable, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, " + ", ".join(versions))


def markdown_table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


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
        ok = report(args, scenarios, rows, t0, started, final=i + 1 == len(order))
    return 0 if ok else 1


def report(args, scenarios, rows, t0, started, final: bool) -> bool:
    """Write the CSV and the .md (after every run, so an interrupted campaign leaves its runs); print at the end."""
    elapsed = time.time() - t0

    header = ["scenario", "runs", "survived", "all steps but rc 4 (evicted process's exit)", "clean stops", "hangs", "unclean", "recovery median (s)",
              "recovery max (s)", "join latency median (s)", "join latency max (s)"]
    table = markdown_table(header, summary_rows(rows, scenarios))
    ok, goal_lines = goal_check(rows)
    if final:
        print("\n" + table + "\n")
        print("goal (0 hangs, every recovery under heartbeat timeout + 2 step times): " + ("MET" if ok else "NOT MET"))
    if final:
        for line in goal_lines:
            print("  " + line)

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    step_times = [r["step_time_s"] for r in rows if r.get("step_time_s")]
    per_run = markdown_table(
        ["run", "scenario", "mode", "victims", "kill after step (+s)", "outcome", "recovery (s)", "join latency (s)",
         "reason / note"],
        [[str(r["run"]), r["scenario"], str(r.get("mode")), str(r.get("victims")),
          f"{r.get('kill_step')} (+{r.get('kill_moment_s')})", r["outcome"],
          "-" if r.get("recovery_s") is None else f"{r['recovery_s']:.2f}",
          "-" if r.get("join_latency_s") is None else f"{r['join_latency_s']:.2f}",
          "; ".join(x for x in (r.get("reason", "") if r["outcome"] != "survived" else "", r.get("note", ""))
                    if x).replace("|", "/")] for r in rows])
    md = f"""# Kill campaign (issue #12)

`benchmarks/kill_campaign.py --runs {args.runs} --seed {args.seed} --steps {args.steps} --timeout_s {args.timeout_s:g}`
(scenarios: {', '.join(scenarios)}), started {started}, {elapsed / 60:.1f} min{'' if final else f', INTERRUPTED after {len(rows)} runs'}.{(' Code: ' + args.code_note) if args.code_note else ''}

{table}

Goal (0 hangs, every recovery under heartbeat timeout + 2 step times): **{'met' if ok else 'not met'}**
{chr(10).join('- ' + line for line in goal_lines)}

## Protocol

- Machine: {machine()}. Other engineers' heavy jobs were serialised with this one by
  `flock /tmp/heavy.lock`; the machine may still carry light load.
- Each run: `mpirun --with-ft ulfm --oversubscribe --map-by slot --bind-to none -n 4+spares
  python launch/train.py --model tiny --steps {args.steps} --eval_every 0` (`--fault_tolerant` with no spare),
  `DS_ACCELERATOR=cpu OMP_NUM_THREADS=1`, config `ds_configs/checkfree.json` with the scenario's mode, spares
  and timeouts (heartbeat interval 0.5 s, heartbeat timeout 10 s unless stated, data-plane timeout 30 s).
  Median step time over the runs: {fmt(step_times)} s.
- Scenarios (drawn balanced: the list repeated to {args.runs} runs, shuffled with seed {args.seed}; each run's
  victim(s), mode, kill step and moment from its own seed, in the CSV): {'; '.join(f'`{s}`: {DESCRIBE[s]}' for s in scenarios)}.
  Single-victim draws: CheckFree (victim stage 1 or 2) or CheckFree+ (any stage). Non-adjacent pairs: (0,2),
  (1,3), (0,3). `second_kill`'s second victim: a stage not adjacent to the first, or spare rank 4 (the one
  taking the first victim's place).
- Moment: mid-run kills after step k ~ U[5, 25] plus a delay ~ U[0, 1) x that step's time (forward, backward
  or optimizer step); start-up kills 1-8 s after the victim's process appeared.
- Hard timeout {args.timeout_s:g} s per run (launch to exit of mpirun and any joiner); past it the run is a hang.
- Outcomes: survived = rc 0 and steps 1..{args.steps} all in metrics.jsonl (and the joiner exited 0);
  "all steps but rc 4" = every step done, no Traceback, and mpirun's non-zero status is the exit status 4
  (`EXIT_EVICTED`) of the stopped process, which left by itself after SIGCONT once evicted; clean stop = non-zero rc with an `unrecoverable` event or a `fatal:` line and no Traceback; unclean = the rest.
- Recovery = kill (the first one; the SIGSTOP) -> `next_step_done_at` of the first `recovery_timeline` after the
  last kill; join latency = joiner command start -> that same event. The goal's bound is per run (its heartbeat
  timeout + 2 x its median step time); join runs are judged by their join latency instead (their recovery
  includes the 2 s wait and the joiner's start-up).

## Runs

{per_run}
"""
    md_path = os.path.splitext(args.out)[0] + ".md"
    Path(md_path).write_text(md)
    if final:
        print(f"\nwrote {args.out} and {md_path} ({elapsed / 60:.1f} min); logs in {args.work}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
