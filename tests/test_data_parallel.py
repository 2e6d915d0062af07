"""Data parallelism x pipeline (8 ranks = 4 stages x 2 replicas, logical failures): a lost
replica with a live twin is restored by an exact copy; a whole lost column by CheckFree."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import events_of, read_metrics, run_job, steps_of, write_config


def _dump(d, step, stage, dp, tag):
    return torch.load(d / f"step{step}_stage{stage}_dp{dp}_{tag}.pt", weights_only=False)


def _same_optimizer_state(a: dict, b: dict) -> bool:
    sa, sb = a["state"], b["state"]
    if sa.keys() != sb.keys() or not sa:
        return False
    for idx in sa:
        if sa[idx].keys() != sb[idx].keys():
            return False
        for key, v in sa[idx].items():
            w = sb[idx][key]
            if torch.is_tensor(v) and not torch.equal(v, w) or not torch.is_tensor(v) and v != w:
                return False
    return True


def test_replica_copy_is_exact_and_a_whole_column_uses_checkfree(tmp_path):
    cfg = write_config(tmp_path / "ds.json")
    dumps, out = tmp_path / "dumps", tmp_path / "out"
    run_job("deepspeed", 8, "launch/train.py",
            ["--deepspeed_config", str(cfg), "--model", "tiny", "--output_dir", str(out), "--eval_every", "0",
             "--steps", "5", "--fail_at", "1.1:3", "--fail_at", "2:4", "--dump_recovery_dir", str(dumps)])

    # step 3: stage 1's replica 1 lost, replica 0 alive -> exact copy of replica 0
    twin, lost = _dump(dumps, 3, 1, 0, "before"), _dump(dumps, 3, 1, 1, "before")
    wiped, restored = _dump(dumps, 3, 1, 1, "wiped"), _dump(dumps, 3, 1, 1, "after")
    assert all(torch.equal(twin["state"][k], lost["state"][k]) for k in twin["state"])  # replicas were identical
    assert not any(torch.equal(wiped["state"][k], twin["state"][k]) for k in twin["state"])  # really wiped
    assert all(torch.equal(restored["state"][k], twin["state"][k]) for k in twin["state"])  # bit for bit
    assert restored["optimizer_state_entries"] == twin["optimizer_state_entries"] > 0
    assert _same_optimizer_state(restored["optimizer_state_dict"], twin["optimizer_state_dict"])
    assert restored["lr_scale"] == twin["lr_scale"] == 1.0  # no lr change
    assert restored["recovery_norm"] == twin["recovery_norm"]
    assert all(torch.equal(_dump(dumps, 3, 1, 0, "after")["state"][k], twin["state"][k]) for k in twin["state"])
    # one training step later the two replicas are still identical (same weights and Adam state)
    a, b = _dump(dumps, 4, 1, 0, "before"), _dump(dumps, 4, 1, 1, "before")
    assert not any(torch.equal(a["state"][k], twin["state"][k]) for k in a["state"] if k.endswith("proj.weight"))
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])

    # step 4: every replica of stage 2 lost -> the CheckFree rule in each replica column
    prev, nxt = _dump(dumps, 4, 1, 0, "before"), _dump(dumps, 4, 3, 0, "before")
    bw, aw = prev["recovery_norm"] + 1e-4, nxt["recovery_norm"] + 1e-4
    new0, new1 = _dump(dumps, 4, 2, 0, "after"), _dump(dumps, 4, 2, 1, "after")
    keys = [k for k in new0["state"] if k.startswith("decoder.")]
    assert len(keys) == 18
    for k in keys:
        expected = (aw * nxt["state"][k].double() + bw * prev["state"][k].double()) / (aw + bw)
        assert torch.allclose(new0["state"][k].double(), expected, atol=1e-6), k
        assert torch.equal(new0["state"][k], new1["state"][k]), k  # the replicas stay identical
    for new in (new0, new1):
        assert new["optimizer_state_entries"] == 0 and new["lr_scale"] == pytest.approx(1.1)

    records = read_metrics(out)
    assert [(f["step"], f["stage"], f.get("replica")) for f in events_of(records, "failure")] == \
        [(3, 1, 1), (4, 2, None)]
    rec = events_of(records, "recovery")
    assert [(r["step"], r["stage"], r["method"], r["sources"], r.get("replica"), r.get("source_replica"), r["lr_scale"])
            for r in rec] == [(3, 1, "replica", [1], 1, 0, 1.0), (4, 2, "weighted_average", [1, 3], None, None, 1.1)]
    assert rec[0]["bytes_received"] > 0 and rec[1]["weights"] == pytest.approx([bw, aw], rel=1e-9)
    losses = [r["loss"] for r in steps_of(records)]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
