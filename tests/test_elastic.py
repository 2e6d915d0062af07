"""Real process deaths under ``mpirun --with-ft ulfm``: a SIGKILLed stage is replaced by a spare.

Each test launches the main job (4 stages, plus spares) as separate MPI processes, waits
until training has reached a step drawn at random, kills one process with SIGKILL, and
checks what the survivors did: no restart (same PIDs), no checkpoint read, the failure and
the recovery in metrics.jsonl, all steps done.
"""
from __future__ import annotations

import math
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BIN, ROOT, events_of, job_env, read_metrics, steps_accounted, steps_of, write_config
from ds_checkfree.testing import Job, mpirun_cmd, train_args

pytestmark = pytest.mark.skipif(not (BIN / "mpirun").exists(), reason="needs Open MPI's mpirun in the venv")

TRAIN = str(ROOT / "launch" / "train.py")


class ElasticJob(Job):
    """``mpirun --with-ft ulfm -n N python launch/train.py ...`` in the background (``launcher``:
    another command line in front of ``launch/train.py``, e.g. across hosts, see multihost.py):
    the harness's ``Job``, its failures turned into test failures that show the log's tail."""

    def __init__(self, tmp_path: Path, nproc: int, cfg: Path, steps: int, *extra: str,
                 launcher: list[str] | None = None, env: dict | None = None):
        launcher = launcher or mpirun_cmd(nproc, fault_tolerant=True)
        super().__init__([*launcher, *train_args(cfg, tmp_path / "out", steps, extra=extra)], tmp_path / "out",
                         tmp_path / "log.txt", env=env)
        self.nproc = nproc

    def wait_for_step(self, step: int, timeout: float = 240) -> dict:
        try:
            reached = super().wait_for_step(step, timeout)
        except TimeoutError:
            self.stop()
            pytest.fail(f"step {step} not reached in {timeout} s:\n{self.log()[-6000:]}")
        if reached is None:
            pytest.fail(f"job ended (rc={self.proc.returncode}) before step {step}:\n{self.log()[-6000:]}")
        return reached

    def kill(self, rank: int) -> int:
        try:
            return self.signal_rank(rank, signal.SIGKILL)
        except LookupError as err:
            pytest.fail(str(err))

    def wait(self, timeout: float = 300) -> int:
        try:
            return super().wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"job did not finish in {timeout} s:\n{self.log()[-6000:]}")


def exit_pids(log: str) -> dict[int, int]:
    """MPI rank -> PID from the line each process prints as it leaves."""
    return {int(r): int(p) for r, p in re.findall(r"\[(?:rank|member) (\d+)\] exiting \(pid (\d+)\)", log)}


def kill_and_finish(tmp_path, mode: str, victim: int, steps: int = 60, spares: int = 1, seed: int = 0,
                    latest_kill: int = 20, **checkfree):
    cfg = write_config(tmp_path / "ds.json", mode=mode, spares=spares, **checkfree)
    job = ElasticJob(tmp_path, 4 + spares, cfg, steps)
    kill_step = random.Random(seed).randint(6, latest_kill)
    job.wait_for_step(kill_step)
    before = job.rank_pids()
    assert sorted(before) == list(range(4 + spares)), before
    killed = job.kill(victim)
    killed_at = time.time()
    done = max(r["step"] for r in steps_of(read_metrics(job.out)))
    assert done < steps, f"the kill came too late (step {done} of {steps}): the test proves nothing"
    rc = job.wait()
    return job, rc, before, killed, killed_at, kill_step


def _check_survived(job, rc, before, killed, killed_at, victim_stage: int, steps: int, method: str,
                    groups_kept: bool = True):
    """``groups_kept``: whether the writer's idle copies of its groups can serve the recovery
    (not when the coordinator was lost with the ready marks in its store)."""
    log = job.log()
    assert rc == 0, log[-6000:]
    # no survivor restarted: every process that leaves is one that was there before the kill
    left = exit_pids(log)
    survivors = {r: p for r, p in before.items() if p != killed}
    assert left == survivors, (left, survivors)
    records = read_metrics(job.out)
    steps_done = steps_accounted(records)
    assert steps_done == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) for r in steps_of(records))
    failure = events_of(records, "failure")
    assert len(failure) == 1 and failure[0]["cause"] == "process_lost" and failure[0]["stage"] == victim_stage
    assert failure[0]["dead_ranks"] == [victim_stage] and failure[0]["replaced_by_rank"] == 4
    (recovery,) = events_of(records, "recovery")
    assert recovery["stage"] == victim_stage and recovery["method"] == method
    for key in ("agreement_s", "data_plane_s", "engine_rebuild_s", "rematerialise_s", "rebuild_module_s",
                "rebuild_groups_s", "rebuild_engine_s", "rebuild_state_load_s"):
        assert 0 <= recovery[key] < 60, (key, recovery[key])
    # the rebuild's parts are inside it (rounding: 4 decimals each)
    parts = recovery["rebuild_module_s"] + recovery["rebuild_engine_s"] + recovery["rebuild_state_load_s"]
    assert parts <= recovery["engine_rebuild_s"] + 0.001
    assert recovery["rebuild_groups_s"] <= recovery["rebuild_module_s"]
    # the writer's group of one does not hold the lost stage: its idle copy from before the loss
    # is kept (copies form two steps into a generation; the kill comes at step 6 or later)
    assert (recovery["rebuild_groups_kept"] >= 1) == groups_kept, recovery
    assert killed_at - 1 < recovery["failed_at"] <= recovery["agreed_at"] <= recovery["rematerialised_at"]
    (timeline,) = events_of(records, "recovery_timeline")
    assert timeline["step"] == recovery["resume_step"] and timeline["total_s"] > 0
    # the interrupted step was redone, not skipped
    assert recovery["resume_step"] in steps_done
    # nothing read from disk: no checkpoint exists and none was loaded
    assert not events_of(records, "checkpoint_load")
    assert not list(job.out.parent.rglob("*model_states.pt"))
    return records


def test_intermediate_stage_sigkilled_is_replaced_by_the_spare(tmp_path):
    job, rc, before, killed, killed_at, _ = kill_and_finish(tmp_path, "checkfree", victim=2, seed=1)
    records = _check_survived(job, rc, before, killed, killed_at, victim_stage=2, steps=60,
                              method="weighted_average")
    (recovery,) = events_of(records, "recovery")
    assert recovery["sources"] == [1, 3] and recovery["lr_scale"] == pytest.approx(1.1)
    assert "spare: taking the place of stage 2" in job.log()


@pytest.mark.slow  # overlaps test_churn's CheckFree+ kills of stages 0-3; kept out of the default suite for time
def test_first_stage_sigkilled_under_checkfree_plus(tmp_path):
    job, rc, before, killed, killed_at, _ = kill_and_finish(tmp_path, "checkfree_plus", victim=0, seed=2)
    records = _check_survived(job, rc, before, killed, killed_at, victim_stage=0, steps=60, method="copy")
    (recovery,) = events_of(records, "recovery")
    assert recovery["sources"] == [1]  # the swap partner, which also holds the embedding replica


@pytest.mark.slow  # a spare's death changes no stage; the kill campaign covers it; kept out of the default suite for time
def test_idle_spare_killed_does_not_disturb_training(tmp_path):
    # the coordinator sees the spare's connection close at once and tells the members
    job, rc, before, killed, killed_at, _ = kill_and_finish(tmp_path, "checkfree", victim=4, steps=40, seed=3,
                                                            latest_kill=10)
    log = job.log()
    assert rc == 0, log[-6000:]
    records = read_metrics(job.out)
    assert steps_accounted(records) == list(range(1, 41))
    assert not events_of(records, "failure") and not events_of(records, "recovery")
    seen = events_of(records, "heartbeat_timeout")
    assert [(e["peer_rank"], e["role"]) for e in seen] == [(4, "spare")]
    assert exit_pids(log) == {r: p for r, p in before.items() if r != 4}


def test_no_spare_left_stops_cleanly_naming_the_lost_stage(tmp_path):
    cfg = write_config(tmp_path / "ds.json", mode="checkfree", join_wait_s=2.0)
    job = ElasticJob(tmp_path, 4, cfg, 40, "--fault_tolerant")
    job.wait_for_step(8)
    job.kill(1)
    rc = job.wait()
    log = job.log()
    assert rc != 0
    fatal = re.findall(r"\[member (\d+)\] fatal: (.*)", log)
    assert sorted(int(r) for r, _ in fatal) == [0, 2, 3], log[-6000:]
    assert all("stage(s) [1] lost" in msg and "no spare or joining process took them within join_wait_s = 2 s"
               in msg for _, msg in fatal)
    assert "Traceback" not in log
    (event,) = events_of(read_metrics(job.out), "unrecoverable")
    assert "stage(s) [1] lost" in event["reason"]


def test_heartbeats_raise_no_false_alarm_under_full_load(tmp_path):
    """4 stages training flat out on 2 cores plus a spare: hundreds of beats, nobody declared dead,
    even with a timeout 5x tighter than the default."""
    cfg = write_config(tmp_path / "ds.json", mode="checkfree", spares=1, heartbeat_interval_s=0.1,
                       heartbeat_timeout_s=2.0)
    job = ElasticJob(tmp_path, 5, cfg, 60)
    rc = job.wait()
    assert rc == 0, job.log()[-6000:]
    records = read_metrics(job.out)
    assert not events_of(records, "heartbeat_timeout")
    (summary,) = events_of(records, "heartbeat_summary")
    assert summary["peers_declared_dead"] == [] and summary["transport"] == "coordinator"
    assert summary["beats_sent"] >= 50, summary  # ~9 s of training at 0.1 s intervals
    assert summary["transport_error"] is None
    assert "no heartbeat" not in next(job.out.glob("coordinator-*.log")).read_text()


@pytest.mark.slow  # overlaps test_churn's killed joiner replaced by a second one; kept out of the default suite for time
def test_two_deaths_in_a_row_use_both_spares(tmp_path):
    """The replacement itself dies later: the second spare takes over from the new membership."""
    cfg = write_config(tmp_path / "ds.json", mode="checkfree", spares=2)
    job = ElasticJob(tmp_path, 6, cfg, 60)
    job.wait_for_step(12)
    job.kill(1)
    job.wait_for_step(30)
    job.kill(4)  # rank 4 has been stage 1 since the first failure
    rc = job.wait()
    assert rc == 0, job.log()[-6000:]
    records = read_metrics(job.out)
    assert steps_accounted(records) == list(range(1, 61))
    failures = events_of(records, "failure")
    assert [(f["stage"], f["dead_ranks"], f["replaced_by_rank"]) for f in failures] == [(1, [1], 4), (1, [4], 5)]
    assert [r["method"] for r in events_of(records, "recovery")] == ["weighted_average"] * 2


def test_spares_without_the_fault_tolerant_launch_are_refused(tmp_path):
    cfg = write_config(tmp_path / "ds.json", mode="checkfree", spares=1)
    proc = subprocess.run([sys.executable, TRAIN, "--deepspeed_config", str(cfg)], cwd=ROOT, env=job_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "mpirun --with-ft ulfm" in proc.stderr


def kill_a_replica_and_finish(tmp_path, steps: int, **checkfree) -> tuple[list[dict], dict]:
    """3 stages x 2 replicas + 1 spare: SIGKILL the process of stage 1, replica 1 (rank 3) after
    step 6; checks the job finished every step with the same survivors and the spare in that
    slot; returns (records, the recovery event)."""
    cfg = write_config(tmp_path / "ds.json", mode="checkfree", num_stages=3, spares=1, **checkfree)
    job = ElasticJob(tmp_path, 7, cfg, steps, "--num_layers", "6")
    job.wait_for_step(6)
    before = job.rank_pids()
    killed = job.kill(3)
    rc = job.wait()
    log = job.log()
    assert rc == 0, log[-6000:]
    records = read_metrics(job.out)
    assert steps_accounted(records) == list(range(1, steps + 1))
    (failure,) = events_of(records, "failure")
    assert (failure["stage"], failure["replica"], failure["dead_ranks"], failure["replaced_by_rank"]) == (1, 1, [3], 6)
    (recovery,) = events_of(records, "recovery")
    assert exit_pids(log) == {r: p for r, p in before.items() if p != killed}
    return records, recovery


@pytest.mark.slow  # the bf16 variant (test_bf16.py, default suite) kills the same replica and checks more
def test_a_killed_data_parallel_replica_is_copied_from_its_live_replica(tmp_path):
    """3 stages x 2 replicas + 1 spare: the process of stage 1, replica 1 (rank 3) is SIGKILLed;
    the spare takes that slot and gets an exact copy of the live replica (method "replica")."""
    _, recovery = kill_a_replica_and_finish(tmp_path, steps=30)
    assert recovery["stage"] == 1 and recovery["method"] == "replica"


def test_both_replicas_of_a_stage_killed_use_the_checkfree_rule(tmp_path):
    """3 stages x 2 replicas + 2 spares: both processes of stage 1 (ranks 2 and 3) SIGKILLed
    together. No live replica is left to copy, so the spares take both slots and get the
    CheckFree rule (the neighbours' weighted average, lr x1.1), the same on both replicas."""
    steps = 30
    cfg = write_config(tmp_path / "ds.json", mode="checkfree", num_stages=3, spares=2)
    job = ElasticJob(tmp_path, 8, cfg, steps, "--num_layers", "6")
    job.wait_for_step(6)
    before = job.rank_pids()
    killed = {job.kill(2), job.kill(3)}
    rc = job.wait()
    log = job.log()
    assert rc == 0, log[-6000:]
    records = read_metrics(job.out)
    assert steps_accounted(records) == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) for r in steps_of(records))
    failures = events_of(records, "failure")
    assert sorted((f["stage"], f["replica"], f["replaced_by_rank"]) for f in failures) == [(1, 0, 6), (1, 1, 7)]
    assert all(f["cause"] == "process_lost" and f["dead_ranks"] == [2, 3] for f in failures)
    (recovery,) = events_of(records, "recovery")
    assert (recovery["stage"], recovery["method"], recovery["sources"]) == (1, "weighted_average", [0, 2])
    assert recovery["lr_scale"] == pytest.approx(1.1)
    assert exit_pids(log) == {r: p for r, p in before.items() if p not in killed}

