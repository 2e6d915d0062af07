"""The shared harness (ds_checkfree.testing): the metrics reader's rule for a half-written line,
the command lines it builds, and the /proc lookup of a rank's process (on real processes)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from ds_checkfree.metrics import MetricsWriter
from ds_checkfree.testing import (BIN, REPO, TRAIN, is_gone, job_env, launcher_cmd, mpirun_cmd, rank_pids,
                                  read_metrics, recovery_phases, standalone_env, train_args, wait_gone)


def _written(tmp_path, steps: int) -> MetricsWriter:
    w = MetricsWriter(str(tmp_path))
    for s in range(1, steps + 1):
        w.step(s, loss=3.0 - s / 10, lr=1e-3, step_time_s=0.1, tokens_per_s=100.0, grad_norms=[1.0])
    return w


def test_a_half_written_last_line_is_left_out_until_it_is_whole(tmp_path):
    w = _written(tmp_path, 2)
    line = json.dumps({"step": 3, "loss": 2.7}) + "\n"
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(line[:10])  # the writer caught mid-line
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(line[10:])
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    w.close()


def test_a_whole_last_line_without_its_newline_is_kept(tmp_path):
    _written(tmp_path, 1).close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"event": "run_end", "step": 1}))
    assert [r.get("event") for r in read_metrics(tmp_path)] == [None, "run_end"]


def test_a_broken_line_before_the_last_is_damage_and_says_where(tmp_path):
    _written(tmp_path, 1).close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: .*damaged"):
        read_metrics(tmp_path)


def test_a_missing_file_is_an_error_unless_the_run_may_still_be_starting(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path)
    assert read_metrics(tmp_path / "not_yet", missing_ok=True) == []


def test_the_fault_tolerant_mpirun_line():
    cmd = mpirun_cmd(5, fault_tolerant=True)
    assert cmd[:3] == [str(BIN / "mpirun"), "--with-ft", "ulfm"] and cmd[-1] == sys.executable
    assert cmd[cmd.index("-n") + 1] == "5" and "--oversubscribe" in cmd
    assert [cmd[i + 1] for i, x in enumerate(cmd) if x == "-x"] == ["OMP_NUM_THREADS", "DS_ACCELERATOR",
                                                                  "PYTHONPATH", "PYTHONUNBUFFERED"]
    assert "--with-ft" not in mpirun_cmd(4)
    across = mpirun_cmd(5, fault_tolerant=True, placement=["--hostfile", "hosts"], options=["--mca", "a", "b"])
    assert "--oversubscribe" not in across and across.index("--hostfile") < across.index("--mca") < across.index("-n")


def test_each_launcher_and_the_combinations_refused():
    ds = launcher_cmd("deepspeed", 4)
    assert ds[ds.index("--num_gpus") + 1] == "4" and int(ds[ds.index("--master_port") + 1]) > 0
    tr = launcher_cmd("torchrun", 3)
    assert tr[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3"]
    assert tr[-2:] == ["--no-python", sys.executable]
    cuda = launcher_cmd("torchrun", 2, accelerator="cuda")
    assert cuda[-2].endswith("scripts/one_gpu_rank.sh") and (REPO / "scripts" / "one_gpu_rank.sh").exists()
    assert launcher_cmd("mpirun", 5, fault_tolerant=True) == mpirun_cmd(5, fault_tolerant=True)
    with pytest.raises(ValueError, match="choose one of"):
        launcher_cmd("srun", 4)
    with pytest.raises(ValueError, match="mpirun's"):
        launcher_cmd("torchrun", 4, fault_tolerant=True)
    with pytest.raises(ValueError, match="torchrun"):
        launcher_cmd("mpirun", 4, accelerator="cuda")


def test_train_args_and_a_hand_started_process_environment(monkeypatch):
    assert train_args("c.json", "out", 12, extra=["--spares", 1]) == [
        str(TRAIN), "--deepspeed_config", "c.json", "--model", "tiny", "--steps", "12", "--eval_every", "0",
        "--output_dir", "out", "--spares", "1"]
    assert "--eval_every" not in train_args("c.json", "out", 5, eval_every=None)
    assert TRAIN.exists()
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "2")
    monkeypatch.setenv("RANK", "2")
    assert "OMPI_COMM_WORLD_RANK" in job_env() and job_env()["PYTHONPATH"].startswith(str(REPO))
    env = standalone_env(LOCAL_RANK="0")
    assert "OMPI_COMM_WORLD_RANK" not in env and "RANK" not in env and env["LOCAL_RANK"] == "0"
    assert env["DS_ACCELERATOR"] == "cpu" and env["OMP_NUM_THREADS"] == "1"


def test_a_ranks_process_is_found_by_its_output_dir_and_rank_variable(tmp_path):
    out = str(tmp_path / "out")
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    procs = [subprocess.Popen([*sleeper, out], env=dict(job_env(), OMPI_COMM_WORLD_RANK=str(r))) for r in (0, 1)]
    other = subprocess.Popen([*sleeper, out + "_other"], env=dict(job_env(), OMPI_COMM_WORLD_RANK="0"))
    launcher = subprocess.Popen([*sleeper, out], env=standalone_env())  # the job's dir, but no rank
    try:
        assert rank_pids(out) == {0: procs[0].pid, 1: procs[1].pid}
        assert rank_pids(out, "RANK") == {}
        procs[1].send_signal(signal.SIGKILL)
        assert wait_gone(procs[1].pid, 10)  # a zombie (not reaped yet) counts as gone
        assert is_gone(procs[1].pid) and not is_gone(procs[0].pid)
        assert rank_pids(out) == {0: procs[0].pid}
    finally:
        for p in (*procs, other, launcher):
            p.kill()
            p.wait()


def test_recovery_phases_add_up_to_the_kill_to_next_step_total():
    rec = {"event": "recovery", "method": "weighted_average", "failed_at": 11.0, "revoked_at": 11.5,
           "agreed_at": 12.0, "data_plane_s": 0.1, "engine_rebuild_s": 0.2, "rematerialise_s": 0.05,
           "rematerialised_at": 12.4}
    line = {"event": "recovery_timeline", "next_step_done_at": 12.9}
    phases = dict(recovery_phases([{"step": 1, "loss": 1.0}, rec, line], killed_at=10.0))
    assert phases["detection (kill -> error seen by the last stage)"] == pytest.approx(1.0)
    assert phases["total: kill -> next completed step"] == pytest.approx(2.9)
    assert phases["redo the interrupted step"] == pytest.approx(0.5)
    assert "snapshot + abort + forget groups" in dict(recovery_phases([rec, line], 10.0, "nccl"))
