"""``--resume_from``: a restarted job continues from the latest DeepSpeed checkpoint (the
conventional recovery that the benchmarks time against CheckFree)."""
from __future__ import annotations

import subprocess
import sys

from conftest import ROOT, events_of, job_env, read_metrics, run_job, steps_of, write_config

TRAIN = "launch/train.py"


def test_restarted_job_resumes_after_the_last_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    cfg = write_config(tmp_path / "ds.json", mode="off", checkpoint_every=4, checkpoint_dir=str(ckpt))
    common = ["--deepspeed_config", str(cfg), "--model", "tiny", "--eval_every", "0"]
    run_job("deepspeed", 4, TRAIN, [*common, "--steps", "9", "--output_dir", str(tmp_path / "first")])
    first = read_metrics(tmp_path / "first")
    assert [e["step"] for e in events_of(first, "checkpoint_save")] == [0, 4, 8]

    run_job("deepspeed", 4, TRAIN, [*common, "--steps", "12", "--output_dir", str(tmp_path / "second"),
                                    "--resume_from", str(ckpt)])
    second = read_metrics(tmp_path / "second")
    (load,) = events_of(second, "checkpoint_load")
    assert load["resumed_from"] == 8 and load["restart"] is True and load["bytes"] > 0
    (start,) = events_of(second, "run_start")
    assert start["step"] == 9 and start["startup_s"] > 0
    assert [r["step"] for r in steps_of(second)] == [9, 10, 11, 12]
    # the resumed step 9 starts from the state the first job had after step 8: same loss
    assert steps_of(second)[0]["loss"] == next(r["loss"] for r in steps_of(first) if r["step"] == 9)


def test_resume_from_a_directory_without_checkpoint_is_refused(tmp_path):
    cfg = write_config(tmp_path / "ds.json", mode="off")
    proc = subprocess.run([sys.executable, str(ROOT / TRAIN), "--deepspeed_config", str(cfg),
                           "--resume_from", str(tmp_path)], cwd=ROOT, env=job_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "--resume_from" in proc.stderr and "no DeepSpeed checkpoint" in proc.stderr
