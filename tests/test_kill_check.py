"""A job without a launcher (``ds_checkfree.testing.direct_job``, which ``scripts/kill_check.py``
and ``benchmarks/recovery_scaling.py --launcher direct`` use) finds who holds which slot from
what the coordinator and the members print (the real runs: the slow CPU dry run of
``gpu_check.sh``, and a GPU)."""
from __future__ import annotations

import importlib.util

import pytest

from conftest import ROOT
from ds_checkfree.testing.direct_job import launcher_ranks, member_pids, start_up_roles

_spec = importlib.util.spec_from_file_location("kill_check", ROOT / "scripts" / "kill_check.py")
kill_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kill_check)


def test_roles_of_the_first_generation_are_read_from_the_coordinator_log(tmp_path):
    log = tmp_path / "coordinator.log"
    log.write_text("[coordinator] member 5 (vm pid 8315, joining) connected\n"
                   "[coordinator] generation 1: roles {5: 0, 6: 1, 7: 2, 8: 3, 9: None}, dead [], evicted [], "
                   "lost stages [], replacements {0: 5}, resume at step 1 (fresh start) [start-up]\n"
                   "[coordinator] generation 2: roles {9: 1, 5: 0, 7: 2, 8: 3}, dead [6]\n")
    assert start_up_roles(log) == {5: 0, 6: 1, 7: 2, 8: 3, 9: None}
    log.write_text("[coordinator] listening\n")
    assert start_up_roles(log) == {}


def test_member_pids_come_from_each_members_first_line(tmp_path):
    logs = []
    for i, (mid, pid) in enumerate([(5, 8315), (6, 8320)]):
        logs.append(tmp_path / f"member{i}.log")
        logs[-1].write_text(f"noise\n[member {mid}] vm pid {pid}: member of the job at 127.0.0.1:1 (advertising x)\n")
    logs.append(tmp_path / "member2.log")
    logs[-1].write_text("still importing\n")
    assert member_pids(logs) == {5: 8315, 6: 8320}


def test_slots_come_first_then_the_spares_in_member_order():
    roles = {5: 0, 6: 1, 7: 2, 8: 3, 9: None, 4: None}
    pids = {4: 104, 5: 105, 6: 106, 7: 107, 8: 108, 9: 109}
    assert launcher_ranks(roles, pids) == {0: 105, 1: 106, 2: 107, 3: 108, 4: 104, 5: 109}
    # a member whose first line is not written yet is left out; the others keep their numbers
    assert launcher_ranks(roles, {5: 105, 9: 109}) == {0: 105, 5: 109}


def test_edge_victims_are_refused():
    with pytest.raises(SystemExit):
        kill_check.main(["--accelerator", "cpu", "--victim", "0"])


@pytest.mark.parametrize("sig", ["KILL", pytest.param("TERM", marks=pytest.mark.slow)])
def test_a_job_started_by_hand_without_mpi_survives_a_sigkill(tmp_path, sig):
    """The launch with no MPI at all: the coordinator's own CLI, 4 stage processes and a spare
    joined by hand (``--join``), stage 1's process SIGKILLed after step 5: the spare takes
    stage 1, the survivors (same processes) finish every step. The GPU check runs this recipe
    on NCCL. With SIGTERM (``slow``; ``test_preemption.py`` covers the hand-off under mpirun)
    the victim hands its stage off and exits 0."""
    import json
    import subprocess
    import sys

    from conftest import job_env
    out = tmp_path / "kc"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "kill_check.py"), "--accelerator", "cpu",
                           "--out", str(out), "--steps", "12", "--kill_step", "5", "--timeout", "180",
                           "--signal", sig],
                          cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "kill_check.json").read_text())
    victim = str(r["victim_member"])
    assert r["exit_codes"].pop(victim) == (-9 if sig == "KILL" else 0) and set(r["exit_codes"].values()) == {0}
    assert r["steps_done"] == 12 and r["recoveries"] == 1 and r["failed"] == []
    assert r["methods"] == (["weighted_average"] if sig == "KILL" else ["handoff"])
    phases = dict(r["phases"])  # where kill -> next step went, as real_failure.py reports it
    total = phases["total: kill -> next completed step" if sig == "KILL" else "total: SIGTERM -> next completed step"]
    assert total == pytest.approx(r["kill_to_next_step_s"])
    first = "detection (kill -> error seen by the last stage)" if sig == "KILL" else \
        "the preempted stage finishes its step (SIGTERM -> step done)"
    assert -0.05 < phases[first] < total  # the signal time is taken by the parent just after os.kill
    coord = (out / "coordinator.log").read_text()
    assert "generation 2:" in coord and "lost stages [1]" in coord
    logs = "".join(p.read_text() for p in out.glob("member*.log"))
    assert "spare: taking the place of stage 1" in logs
