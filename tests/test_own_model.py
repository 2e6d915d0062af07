"""A user's own model and loop (examples/own_model.py) made fault-tolerant through the public API.

Real jobs: the example's plain-PyTorch GPT-style layers go through ``PipelineParts`` and
``Manager``; a logical failure of a middle stage is rebuilt by weighted average, one of an
edge stage under CheckFree+ by copy, and a real SIGKILL under ``mpirun --with-ft ulfm`` is
survived by the spare (there with a tiny Hugging Face Llama driven by the same loop).
"""
from __future__ import annotations


import pytest
import torch
from deepspeed.pipe import LayerSpec

from conftest import BIN, ROOT, events_of, read_metrics, run_job, steps_of, write_config
from ds_checkfree.config.checkfree import ConfigError
from ds_checkfree.pipe.parts import PipelineParts, check_parts
from ds_checkfree.testing import Job, mpirun_cmd
from hf_fixtures import make_hf_dir

EXAMPLE = "examples/own_model.py"


def _run(tmp_path, base: str, fail_at: str, steps: int = 8):
    cfg = write_config(tmp_path / "ds.json", base)
    out = tmp_path / "out"
    run_job("deepspeed", 4, EXAMPLE, ["--deepspeed_config", str(cfg), "--steps", str(steps), "--output_dir", str(out),
                                      "--fail_at", fail_at])
    return read_metrics(out)


def test_own_model_middle_stage_rebuilt_by_weighted_average(tmp_path):
    records = _run(tmp_path, "checkfree.json", "2:4")
    assert [r["step"] for r in steps_of(records)] == list(range(1, 9))
    (rec,) = events_of(records, "recovery")
    assert rec["stage"] == 2 and rec["method"] == "weighted_average" and sorted(rec["sources"]) == [1, 3]
    assert len(rec["weights"]) == 2 and all(w > 0 for w in rec["weights"])  # the neighbours' gradient norms


def test_own_model_edge_stage_rebuilt_by_copy_under_checkfree_plus(tmp_path):
    records = _run(tmp_path, "checkfree_plus.json", "0:4")
    assert [r["step"] for r in steps_of(records)] == list(range(1, 9))
    (rec,) = events_of(records, "recovery")
    assert rec["stage"] == 0 and rec["method"] == "copy" and rec["sources"] == [1]


@pytest.mark.skipif(not (BIN / "mpirun").exists(), reason="needs Open MPI's mpirun in the venv")
def test_own_loop_with_an_hf_model_survives_a_real_sigkill_under_ulfm(tmp_path):
    src = make_hf_dir(tmp_path / "hf", "llama", layers=4)
    cfg = write_config(tmp_path / "ds.json", "checkfree.json", heartbeat_interval_s=0.2, heartbeat_timeout_s=3.0)
    out = tmp_path / "out"
    cmd = [*mpirun_cmd(5, fault_tolerant=True), str(ROOT / EXAMPLE), "--deepspeed_config", str(cfg),
           "--steps", "30", "--spares", "1", "--output_dir", str(out), "--hf", str(src)]
    job = Job(cmd, out, tmp_path / "log.txt")
    try:
        assert job.wait_for_step(6, timeout=180) is not None, job.log()[-4000:]
        job.signal_rank(2)  # stage 2 at launch (rank 4 is the spare)
        rc = job.wait(timeout=240)
    finally:
        job.stop()
    log = job.log()
    assert rc == 0, log[-4000:]
    records = read_metrics(out)
    assert steps_of(records)[-1]["step"] == 30
    failures = [e for e in events_of(records, "failure") if e["cause"] == "process_lost"]
    assert [f["stage"] for f in failures] == [2]
    (rec,) = events_of(records, "recovery")
    assert rec["stage"] == 2 and rec["method"] == "weighted_average"


class _Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = torch.nn.Linear(width, width)


def _parts(blocks, **kw):
    return PipelineParts(head=[LayerSpec(torch.nn.Embedding, 10, 8)], blocks=blocks,
                         tail=[LayerSpec(torch.nn.Linear, 8, 10)], loss_fn=lambda o, l: o.sum(), **kw)


def test_bad_parts_are_refused_naming_the_layer():
    with pytest.raises(ConfigError, match=r"blocks\[2\] \(_Block\) parameter 'fc.weight' has shape \(16, 16\)"):
        check_parts(_parts([LayerSpec(_Block, 8), LayerSpec(_Block, 8), LayerSpec(_Block, 16)]))
    with pytest.raises(ConfigError, match=r"blocks\[1\] .* not a LayerSpec"):
        check_parts(_parts([LayerSpec(_Block, 8), _Block(8)]))
    with pytest.raises(ConfigError, match=r"blocks\[1\] \(Linear\) differs in class"):
        check_parts(_parts([LayerSpec(_Block, 8), LayerSpec(torch.nn.Linear, 8, 8)]))
    with pytest.raises(ConfigError, match="blocks is empty"):
        check_parts(_parts([]))
    check_parts(_parts([LayerSpec(_Block, 8)] * 4))  # a valid model passes


@pytest.mark.skipif(not (BIN / "mpirun").exists(), reason="needs Open MPI's mpirun in the venv")
def test_an_error_that_is_no_lost_peer_stops_the_job_once_without_reagreement(tmp_path):
    """An out-of-memory raised in stage 2's forward (block 2, its 10th call: step 3 of 4 micro-
    batches) is not a lost process: the job stops with that reason, the spare never takes a
    stage and no member agrees on a new generation."""
    cfg = write_config(tmp_path / "ds.json", "checkfree.json", spares=1, heartbeat_interval_s=0.2,
                       heartbeat_timeout_s=3.0)
    out = tmp_path / "out"
    cmd = [*mpirun_cmd(5, fault_tolerant=True), str(ROOT / "tests/workers/raising_block_worker.py"),
           "--deepspeed_config", str(cfg), "--steps", "8", "--output_dir", str(out), "--raise_block", "2",
           "--raise_at_call", "10"]
    job = Job(cmd, out, tmp_path / "log.txt")
    try:
        rc = job.wait(timeout=240)
    finally:
        job.stop()
    log = job.log()
    assert rc != 0, log[-3000:]
    assert log.count("stopping the job: OutOfMemoryError: injected: block 2 out of memory at forward 10") == 1, \
        log[-3000:]
    assert "Traceback" in log and "torch.OutOfMemoryError" in log  # raised where it happened, with its traceback
    for sign in ("agreeing on the survivors", "takes its place", "spare: taking the place"):
        assert sign not in log, f"a recovery ran: {sign!r}\n{log[-3000:]}"
    assert [r["step"] for r in steps_of(read_metrics(out))] == [1, 2]
