"""The paper's layout (issue #11 item 1): embedding and head on their own never-failing
stages, first/last block stage restored alone from an in-memory copy, no rollback."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import events_of, read_metrics, run_job, steps_of, write_config
from ds_checkfree.config import layout as L
from ds_checkfree.config.checkfree import CheckFreeConfig, ConfigError
from ds_checkfree.config.deepspeed_checks import validate_world
from ds_checkfree.recovery.injection import FailurePlan
from ds_checkfree.recovery.rules import RecoveryAction as A
from ds_checkfree.recovery.rules import UnrecoverableFailure, plan_recovery


def test_stage_slots_put_embedding_and_head_alone():
    slots = L.stage_slots(8, 6, "checkfree", "paper")
    assert slots[0] == [L.Slot(L.EMBED)] and slots[5] == [L.Slot(L.HEAD)]
    assert [[s.index for s in st] for st in slots[1:5]] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert L.block_stages(6, "paper") == [1, 2, 3, 4] and L.never_fail_stages(6, "paper") == [0, 5]
    assert L.never_fail_stages(6) == [] and L.stage_slots(8, 4, "checkfree")[0][0] == L.Slot(L.EMBED)
    assert L.copy_holders(6, "paper") == {1: 0, 4: 5}
    assert L.copy_holders(3, "paper") == {1: 0}  # one block stage: its copy on the embedding stage
    assert L.copy_holders(6, "paper", "off") == {} and L.copy_holders(6) == {}
    with pytest.raises(ValueError, match="at least 3"):
        L.stage_slots(8, 2, "off", "paper")
    with pytest.raises(ValueError, match="split evenly over 3"):
        L.stage_slots(8, 5, "checkfree", "paper")


@pytest.mark.parametrize("kwargs,needle", [
    (dict(layout="paper", num_stages=6, fail_at=["0:5"]), "stage 0 holds only the embedding"),
    (dict(layout="paper", num_stages=6, fail_at=["5:5"]), "final norm + LM head"),
    (dict(layout="paper", num_stages=2, mode="off"), "needs at least 3 stages"),
    (dict(layout="paper", mode="checkfree_plus"), "not implemented for mode 'checkfree_plus'"),
    (dict(layout="paper", mode="redundant"), "not implemented for mode 'redundant'"),
    (dict(layout="paper", stage_copy_every=0), "stage_copy_every = 0"),
    (dict(layout="papr"), 'did you mean "paper"'),
    (dict(layout="paper", spares=1), "real process death"),
])
def test_paper_layout_config_errors_name_key_value_and_fix(kwargs, needle):
    with pytest.raises(ConfigError) as err:
        CheckFreeConfig(**kwargs)
    assert needle in str(err.value) and "Fix:" in str(err.value)


def test_layer_count_is_checked_against_the_block_stages():
    cf = CheckFreeConfig(layout="paper", num_stages=6)
    assert validate_world(cf, 6, 8, 4) == 1  # 8 layers over 4 block stages
    with pytest.raises(ConfigError, match="not divisible by the 3 decoder stages"):
        validate_world(CheckFreeConfig(layout="paper", num_stages=5), 5, 8, 4)


def test_planner_restores_first_and_last_block_stage_from_their_copies():
    assert plan_recovery([1], 6, "checkfree", layout="paper") == [A(1, "stage_copy", (0,))]
    assert plan_recovery([4], 6, "checkfree", layout="paper") == [A(4, "stage_copy", (5,))]
    assert plan_recovery([2], 6, "checkfree", layout="paper") == [A(2, "weighted_average", (1, 3))]
    assert plan_recovery([1, 3], 6, "checkfree", layout="paper") == [A(1, "stage_copy", (0,)),
                                                                     A(3, "weighted_average", (2, 4))]
    assert plan_recovery([1, 4], 6, "checkfree", layout="paper") == [A(1, "stage_copy", (0,)),
                                                                     A(4, "stage_copy", (5,))]
    assert plan_recovery([1], 3, "checkfree", layout="paper") == [A(1, "stage_copy", (0,))]
    # the embedding/head stages have no rule (they never fail by design); a real loss of one rolls back
    with pytest.raises(UnrecoverableFailure, match="holds only the embedding"):
        plan_recovery([0], 6, "checkfree", layout="paper")
    assert plan_recovery([5], 6, "checkfree", layout="paper", has_checkpoint=True) == [A(5, "checkpoint", ())]
    with pytest.raises(UnrecoverableFailure, match="adjacent"):
        plan_recovery([2, 3], 6, "checkfree", layout="paper")
    # mode off in the paper layout: the checkpoint baseline with the same failure domain
    assert plan_recovery([2], 6, "off", has_checkpoint=True, layout="paper") == [A(2, "checkpoint", ())]


def test_rate_draws_never_hit_the_embedding_or_head_stage_and_match_elsewhere():
    paper = FailurePlan(6, rate_percent_per_hour=99.0, step_seconds=900.0, seed=3, never_fail=[0, 5])
    every = FailurePlan(6, rate_percent_per_hour=99.0, step_seconds=900.0, seed=3)
    fp, fe = paper.failures_between(1, 200), every.failures_between(1, 200)
    assert fp and not any(f.stage in (0, 5) for f in fp)
    assert any(f.stage in (0, 5) for f in fe)
    assert fp == [f for f in fe if f.stage not in (0, 5)]  # the block stages' draws are unchanged
    with pytest.raises(ValueError, match="never fails"):
        FailurePlan(6, fail_at=["0:3"], never_fail=[0, 5])


def _dump(d, step, stage, tag):
    return torch.load(d / f"step{step}_stage{stage}_dp0_{tag}.pt", weights_only=False)


def test_paper_layout_restores_block_stages_without_rollback(tmp_path):
    """5 stages (embedding | 3 block stages of 2 layers | head), copies every 3 steps: the last
    block stage lost at 4 (fresh copy), the first at 6 (copy of step 3, two steps stale), the
    middle one at 7 (neighbour average); every step runs once, nothing is reloaded."""
    cfg = write_config(tmp_path / "ds.json", num_stages=5, layout="paper", stage_copy_every=3)
    dumps, out = tmp_path / "dumps", tmp_path / "out"
    run_job("deepspeed", 5, "launch/train.py",
            ["--deepspeed_config", str(cfg), "--model", "tiny", "--num_layers", "6", "--output_dir", str(out),
             "--eval_every", "0", "--steps", "8", "--fail_at", "3:4", "--fail_at", "1:6", "--fail_at", "2:7",
             "--dump_recovery_dir", str(dumps)], timeout=400)
    records = read_metrics(out)
    assert [r["step"] for r in steps_of(records)] == list(range(1, 9))
    assert not events_of(records, "checkpoint_load")
    rec = {r["stage"]: r for r in events_of(records, "recovery")}
    assert rec[3]["method"] == "stage_copy" and rec[3]["sources"] == [4]
    assert rec[3]["copy_of_step"] == 3 and rec[3]["staleness_steps"] == 0
    assert rec[1]["method"] == "stage_copy" and rec[1]["sources"] == [0]
    assert rec[1]["copy_of_step"] == 3 and rec[1]["staleness_steps"] == 2
    assert rec[2]["method"] == "weighted_average" and rec[2]["sources"] == [1, 3]
    assert all(r["lr_scale"] == pytest.approx(1.1) for r in rec.values())
    # stage 1 came back exactly as it was after step 3 (the "before" dump at step 4), not as after step 5
    copy, later, new = _dump(dumps, 4, 1, "before"), _dump(dumps, 6, 1, "before"), _dump(dumps, 6, 1, "after")
    assert set(new["state"]) == set(copy["state"]) and len(new["state"]) == 18
    assert all(torch.equal(new["state"][k], copy["state"][k]) for k in new["state"])
    assert not all(torch.equal(later["state"][k], copy["state"][k]) for k in new["state"])
    assert new["optimizer_state_entries"] == 0 and later["optimizer_state_entries"] > 0
    assert new["effective_lr"] == pytest.approx(later["effective_lr"] * 1.1)
    # the embedding and head stages hold nothing else; the neighbours did not move
    assert _dump(dumps, 6, 0, "after")["state"].keys() == {k for k in _dump(dumps, 6, 0, "after")["state"]
                                                           if k.startswith("embed")}
    n0b, n0a = _dump(dumps, 6, 2, "before"), _dump(dumps, 6, 2, "after")
    assert all(torch.equal(n0b["state"][k], n0a["state"][k]) for k in n0b["state"])
    run = json.loads((out / "run.json").read_text())
    assert run["layout"] == "paper" and run["world"]["stage_layers"][0] == ["embed"]
    assert run["world"]["stage_layers"][4] == ["head"]
