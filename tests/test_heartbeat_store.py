"""The heartbeat monitor of the non-MPI launches, over the rendezvous store, in a real 4-rank job.

A rank frozen with SIGSTOP (a stalled node) stops beating: the others report it once it
has been silent past the timeout; every other rank keeps beating, so nobody else is named.
"""
from __future__ import annotations

import pytest

import os
import signal
import subprocess
import time

from conftest import ROOT, events_of, job_env, launch_cmd, read_metrics, steps_of, write_config
from ds_checkfree.testing import rank_pids


@pytest.mark.slow  # liveness logic: test_heartbeat_liveness (unit); a stalled member in a real job: test_churn's SIGSTOP eviction; kept out of the default suite for time
def test_store_heartbeat_reports_a_stalled_rank_and_only_it(tmp_path):
    cfg = write_config(tmp_path / "ds.json", heartbeat_interval_s=0.1, heartbeat_timeout_s=1.5)
    out = tmp_path / "out"
    cmd = launch_cmd("deepspeed", 4, "launch/train.py", ["--deepspeed_config", str(cfg), "--model", "tiny",
                                                         "--steps", "40", "--eval_every", "0",
                                                         "--output_dir", str(out)])
    log = open(tmp_path / "log.txt", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=job_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                if any(r["step"] >= 10 for r in steps_of(read_metrics(out))):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        pid = rank_pids(out, "LOCAL_RANK").get(1)  # DeepSpeed's launcher: LOCAL_RANK per process
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        time.sleep(4.0)  # well past the 1.5 s timeout
        os.kill(pid, signal.SIGCONT)
        assert proc.wait(timeout=240) == 0, (tmp_path / "log.txt").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    records = read_metrics(out)
    assert sorted({r["step"] for r in steps_of(records)}) == list(range(1, 41))
    seen = events_of(records, "heartbeat_timeout")
    assert [(e["peer_rank"], e["stage"]) for e in seen] == [(1, 1)], seen
    (summary,) = events_of(records, "heartbeat_summary")
    assert summary["transport"] == "store" and summary["peers_declared_dead"] == [1]
    assert summary["beats_received"] > 50 and summary["transport_error"] is None
