"""Churn with real processes: joiners take lost stages, a stopped node is evicted, deaths at
awkward moments (before step 1, during a recovery, two at once) end recovered or in a clean
named stop, never in a hang (every wait below has a timeout that fails the test).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BIN, ROOT, events_of, read_metrics, steps_accounted, steps_of, write_config
from ds_checkfree.testing import is_gone, standalone_env, train_args
from test_elastic import ElasticJob, exit_pids

pytestmark = pytest.mark.skipif(not (BIN / "mpirun").exists(), reason="needs Open MPI's mpirun in the venv")


def coordinator_address(job: ElasticJob, timeout: float = 120) -> str:
    """The address rank 0's coordinator announced (the job prints it too)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(job.out.glob("coordinator-*.json")) if job.out.exists() else []
        if found:
            return f"127.0.0.1:{json.loads(found[0].read_text())['port']}"
        time.sleep(0.1)
    job.stop()
    pytest.fail("no coordinator announced")


class Joiner:
    """``python launch/train.py ... --join HOST:PORT``: a process started outside mpirun."""

    def __init__(self, tmp_path: Path, name: str, cfg: Path, steps: int, address: str, out: Path):
        self.log_path = tmp_path / f"{name}.txt"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, *train_args(cfg, out, steps, extra=["--join", address])],
                                     cwd=ROOT, env=standalone_env(), stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.started_at = time.time()

    def log(self) -> str:
        return self.log_path.read_text()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"joiner did not finish in {timeout} s:\n{self.log()[-4000:]}")


def wait_for(predicate, timeout: float, what: str, job: ElasticJob):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    job.stop()
    pytest.fail(f"{what} not within {timeout} s:\n{job.log()[-6000:]}")


def failures(job) -> list[tuple]:
    return [(f["stage"], f["dead_ranks"], f["replaced_by_rank"]) for f in events_of(read_metrics(job.out), "failure")]


def test_joiners_replace_a_killed_stage_then_the_killed_joiner(tmp_path):
    """4 stages, no spare: stage 2 killed, a process joining 2 s later takes it; that joiner is
    killed in turn and a second joiner replaces it (what ULFM's respawn cannot do)."""
    steps = 70
    cfg = write_config(tmp_path / "ds.json", mode="checkfree", join_wait_s=60.0)
    job = ElasticJob(tmp_path, 4, cfg, steps, "--fault_tolerant")
    address = coordinator_address(job)
    job.wait_for_step(8)
    job.kill(2)
    time.sleep(2.0)
    first = Joiner(tmp_path, "joiner1", cfg, steps, address, job.out)
    wait_for(lambda: len(events_of(read_metrics(job.out), "recovery_timeline")) >= 1, 120, "first rejoin", job)
    assert failures(job) == [(2, [2], 4)]
    done = max(r["step"] for r in steps_of(read_metrics(job.out)))
    job.wait_for_step(done + 3)
    first.proc.send_signal(signal.SIGKILL)
    first.wait(30)
    time.sleep(1.0)
    second = Joiner(tmp_path, "joiner2", cfg, steps, address, job.out)
    rc = job.wait(240)
    assert rc == 0, job.log()[-6000:]
    assert second.wait(60) == 0, second.log()[-4000:]
    records = read_metrics(job.out)
    assert steps_accounted(records) == list(range(1, steps + 1))
    assert failures(job) == [(2, [2], 4), (2, [4], 5)]
    recoveries = events_of(records, "recovery")
    assert [(r["stage"], r["method"], r["sources"]) for r in recoveries] == [(2, "weighted_average", [1, 3])] * 2
    assert "joined: taking the place of stage 2" in second.log(), second.log()[-3000:]
    # the join latency is bounded by start-up (imports) + the rebuild, not by a timeout
    (_, t2) = events_of(records, "recovery_timeline")
    assert t2["total_s"] < 60


def test_a_stopped_stage_is_evicted_replaced_and_exits_on_its_own_when_continued(tmp_path):
    timeout_s, steps = 3.0, 60
    cfg = write_config(tmp_path / "ds.json", mode="checkfree", spares=1, heartbeat_timeout_s=timeout_s)
    job = ElasticJob(tmp_path, 5, cfg, steps)
    job.wait_for_step(8)
    pids = job.rank_pids()
    os.kill(pids[1], signal.SIGSTOP)
    stopped_at = time.time()
    wait_for(lambda: len(events_of(read_metrics(job.out), "recovery_timeline")) >= 1, 60, "recovery", job)
    (timeline,) = events_of(read_metrics(job.out), "recovery_timeline")
    # detection is bounded by the heartbeat timeout (not the 30 s data-plane timeout)
    assert timeline["next_step_done_at"] - stopped_at < timeout_s + 8, timeline
    os.kill(pids[1], signal.SIGCONT)
    wait_for(lambda: is_gone(pids[1]), 30, "the evicted process's exit", job)
    rc = job.wait(180)
    log = job.log()
    assert rc == 0, log[-6000:]
    assert re.search(r"\[member 1 pid \d+\] evicted from the job by the coordinator \(no heartbeat", log), log[-4000:]
    records = read_metrics(job.out)
    assert steps_accounted(records) == list(range(1, steps + 1))
    assert failures(job) == [(1, [1], 4)]
    assert [e["peer_rank"] for e in events_of(records, "heartbeat_timeout")] == [1]
    assert "evicted" in events_of(records, "heartbeat_timeout")[0]["reason"]


def test_a_stage_killed_before_the_first_step_is_taken_by_the_spare(tmp_path):
    """Killed during its imports (before it ever reached the coordinator): the job starts
    without it once ``startup_wait_s`` is over, the spare builds that stage from the seed."""
    steps = 30
    cfg = write_config(tmp_path / "ds.json", mode="checkfree", spares=1, startup_wait_s=10.0)
    job = ElasticJob(tmp_path, 5, cfg, steps)
    wait_for(lambda: 2 in job.rank_pids(), 60, "rank 2's process", job)
    time.sleep(1.0)
    job.kill(2)
    rc = job.wait(240)
    log = job.log()
    assert rc == 0, log[-6000:]
    records = read_metrics(job.out)
    assert steps_accounted(records) == list(range(1, steps + 1))
    assert not events_of(records, "recovery")  # nothing trained yet: nothing to recover
    assert 2 not in exit_pids(log) and 4 in exit_pids(log)


def test_a_second_kill_during_the_recovery_and_two_kills_at_once(tmp_path):
    """CheckFree+, 4 spares: stages 1 and 3 (not adjacent) killed together, then, during the
    next recovery, a second process 0.3 s after the first. Recovered, or a clean named stop."""
    steps = 60
    cfg = write_config(tmp_path / "ds.json", mode="checkfree_plus", spares=4)
    job = ElasticJob(tmp_path, 8, cfg, steps)
    job.wait_for_step(8)
    pids = job.rank_pids()
    os.kill(pids[1], signal.SIGKILL)
    os.kill(pids[3], signal.SIGKILL)
    wait_for(lambda: len(events_of(read_metrics(job.out), "recovery_timeline")) >= 1, 90, "first recovery", job)
    job.wait_for_step(max(r["step"] for r in steps_of(read_metrics(job.out))) + 3)
    os.kill(pids[2], signal.SIGKILL)
    time.sleep(0.3)
    os.kill(pids[0], signal.SIGKILL)
    rc = job.wait(240)
    log = job.log()
    records = read_metrics(job.out)
    if rc == 0:
        assert steps_accounted(records) == list(range(1, steps + 1))
        lost = sorted(s for s, _, _ in failures(job))
        assert lost == [0, 1, 2, 3], failures(job)
    else:  # a clean stop names what was lost, and every survivor says why
        assert events_of(records, "unrecoverable"), log[-6000:]
        assert "Traceback" not in log
