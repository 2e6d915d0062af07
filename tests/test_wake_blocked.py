"""No member left blocked: a member waiting on a stalled peer leaves its wait as soon as the
plane is woken (a membership round opening), whatever gloo does with the operation.

The send case is the one gloo itself never wakes (``ds_checkfree.elastic.plane_waits``): its
data already sits in gloo's transmit queue when the connection is shut, and shutting the
plane's sockets down (all the gloo plane did before) left the member waiting for the whole
data-plane timeout (``Timed out waiting ...ms for send operation to complete``)."""
from __future__ import annotations

import json
import re
import time
import threading

import pytest
from conftest import run_job

from ds_checkfree.config.checkfree import CheckFreeConfig
from ds_checkfree.elastic.plane_waits import InterruptibleWaits, WaitInterrupted

HEARTBEAT_INTERVAL_S = CheckFreeConfig.__dataclass_fields__["heartbeat_interval_s"].default


def test_a_member_blocked_on_a_stalled_peer_wakes_within_the_heartbeat_interval(tmp_path):
    out = tmp_path / "result.json"
    run_job("torchrun", 2, "tests/workers/wake_blocked_worker.py", [str(out)], timeout=180)
    r = json.loads(out.read_text())
    timeout = r["gloo_timeout_s"]
    for case in ("send", "all_reduce"):
        seen = r[case]
        assert seen["raised"] == "WaitInterrupted", (case, seen)  # not gloo's timeout, not a completed op
        assert seen["wake_to_raise_s"] < HEARTBEAT_INTERVAL_S, (case, seen)
        assert seen["blocked_s"] < timeout / 2 and seen["leave_s"] < timeout / 2, (case, seen)
    # the send really was stranded in gloo: its abandoned wait outlived the next two generations
    # (which formed and worked meanwhile), and its groups were dropped once gloo gave up on it
    assert r["stranded_after_send"] >= 1 and r["stranded_at_gen2"] >= 1
    assert r["gen2_sum"] == 2.0
    assert r["stranded_left_after_timeout"] == 0


class _Work:
    """Stands in for a c10d handle: ``wait`` blocks until released (or returns at once)."""

    def __init__(self, block: bool):
        self.release = threading.Event()
        if not block:
            self.release.set()

    def wait(self, *args):
        self.release.wait()
        return True


def _waits_over(original):
    waits = InterruptibleWaits()
    waits._original = original  # as ``install`` would, without patching torch
    return waits


def test_an_interrupt_ends_a_wait_in_progress_and_every_later_one_until_armed():
    waits = _waits_over(lambda work, *args: work.wait(*args))
    assert waits._wait(_Work(block=False), ()) is True
    stuck, ended = _Work(block=True), {}

    def caller():
        try:
            waits._wait(stuck, ())
        except WaitInterrupted as err:
            ended["err"] = err
    t = threading.Thread(target=caller)
    t.start()
    while not waits._pending:
        pass
    assert waits.interrupt() == 1
    t.join(5)
    assert not t.is_alive() and "err" in ended
    with pytest.raises(WaitInterrupted, match="membership round"):
        waits._wait(_Work(block=False), ())
    (retired,) = waits.retire()  # the waiter left in the stuck wait
    assert retired.is_alive() and waits.retire() == []
    waits.arm()
    assert waits._wait(_Work(block=False), ()) is True  # a fresh waiter serves the new generation
    stuck.release.set()
    retired.join(5)
    assert not retired.is_alive()  # it ended with its op, not parked forever


def test_errors_and_results_reach_the_caller():
    def original(work, *args):
        if work == "boom":
            raise RuntimeError("Connection closed by peer")
        return ("done", args)
    waits = _waits_over(original)
    assert waits._wait("ok", (1,)) == ("done", (1,))
    with pytest.raises(RuntimeError, match="closed by peer"):
        waits._wait("boom", ())
    assert waits.interrupt() == 0 and waits.retire() == []  # nothing was in progress: no waiter retired


def test_install_routes_torch_work_wait_and_uninstall_restores_it():
    from ds_checkfree.elastic.c10d_private import work_class
    waits = InterruptibleWaits()
    before = work_class().wait
    waits.install()
    try:
        assert work_class().wait is not before and waits.installed
        waits.install()  # idempotent
    finally:
        waits.uninstall()
    assert work_class().wait is before and not waits.installed


def test_4_stages_x_4_replicas_recover_from_a_sigkill_without_reaching_a_timeout(tmp_path):
    """The shape of issue #29 (4 stages x 4 replicas + 1 spare, ``mpirun --with-ft ulfm``, world
    rank 1 SIGKILLed after a completed step), where a survivor blocked in a gloo send waited out
    the data-plane timeout in 2 of 3 runs: every member must leave its wait when the round opens.
    The smallest pipeline step (2 micro-batches of one sequence, as ``benchmarks/recovery_scaling``):
    17 processes on 2 cores, so that the guard fits the default suite."""
    from ds_checkfree.testing import Job, mpirun_cmd, train_args
    from conftest import BIN, events_of, read_metrics, steps_accounted, write_config
    if not (BIN / "mpirun").exists():
        pytest.skip("needs Open MPI's mpirun in the venv")
    steps, stages, dp, kill_after = 16, 4, 4, 4  # idle copies form 2-9 steps into a generation (by slot)
    cfg = write_config(tmp_path / "ds.json", mode="checkfree", num_stages=stages, spares=1,
                       ds_train_micro_batch_size_per_gpu=1, ds_gradient_accumulation_steps=2)
    job = Job([*mpirun_cmd(stages * dp + 1, fault_tolerant=True), *train_args(cfg, tmp_path / "out", steps)],
              tmp_path / "out", tmp_path / "log.txt")
    try:
        if job.wait_for_step(kill_after, timeout=600) is None:
            pytest.fail(f"the job ended before step {kill_after}:\n{job.log()[-6000:]}")
        _wait_for_idle_copies(job, stages * dp, timeout=120)
        done = job.last_step()["step"]
        assert done < steps - 2, f"the kill would come too late (step {done} of {steps}): the test proves nothing"
        job.signal_rank(1)
        rc = job.wait(timeout=600)
    except BaseException:
        job.stop(dump_stacks=True)
        raise
    log = job.log()
    assert rc == 0, log[-6000:]
    assert "Timed out" not in log and "timed out" not in log, log[-6000:]  # no wait reached gloo's timeout
    records = read_metrics(job.out)
    assert steps_accounted(records) == list(range(1, steps + 1))
    (failure,) = events_of(records, "failure")
    assert failure["dead_ranks"] == [1] and failure["replaced_by_rank"] == stages * dp
    (recovery,) = events_of(records, "recovery")
    assert recovery["method"] == "replica"
    cf = CheckFreeConfig.__dataclass_fields__
    # the round closed long before any member could have waited out the data-plane timeout
    assert recovery["agreement_s"] < cf["data_plane_timeout_s"].default / 2, recovery
    _check_only_the_lost_slots_groups_formed(log, stages, dp, lost_slot=1)


def _wait_for_idle_copies(job, members: int, timeout: float) -> None:
    """Every stage holder formed its idle copies of generation 1 (``standby_groups``): a kill
    before that would form every group anew, which is not what the test is about."""
    deadline = time.monotonic() + timeout
    while len(re.findall(r"generation 1: idle copies of its \d+ groups formed", job.log())) < members:
        if time.monotonic() > deadline:
            pytest.fail(f"not every member formed its idle copies in {timeout} s:\n{job.log()[-6000:]}")
        time.sleep(0.2)


def _check_only_the_lost_slots_groups_formed(log: str, stages: int, dp: int, lost_slot: int) -> None:
    """Issue #29, "rebuild only what changed": after the loss of ``lost_slot``, the groups formed
    anew are exactly those that hold it (its pipe, its data-parallel column, its group of one);
    every other group of every member was kept (its idle copy), so a member outside the lost
    slot's pipe and column formed none."""
    from ds_checkfree.elastic.standby_groups import read_rebuild_lines
    rebuilt = {line["slot"]: (line["kept"], set(line["formed"])) for line in read_rebuild_lines(log)
               if line["generation"] == 2}
    assert sorted(rebuilt) == list(range(stages * dp)), sorted(rebuilt)
    stage, replica = divmod(lost_slot, dp)
    pipe = tuple(s * dp + replica for s in range(stages))
    column = tuple(stage * dp + r for r in range(dp))
    for slot, (kept, formed) in rebuilt.items():
        mine = {m for m in (pipe, column, (lost_slot,)) if slot in m}
        assert formed == mine, (slot, formed, mine)
        if slot != lost_slot:  # the replacement keeps nothing: it had no copies
            assert kept >= 3 - len(mine), (slot, kept)  # pipe, column and group of one, less those formed
