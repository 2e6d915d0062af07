"""The paper's checkpoint baseline (issue #11 item 3): ``checkpoint_restore: "lost_stage"``,
the lost stage alone reloads its stale state; next to DeepSpeed practice's global rollback."""
from __future__ import annotations

import pytest
import torch

from conftest import events_of, read_metrics, run_job, steps_of, write_config
from ds_checkfree.config.checkfree import CheckFreeConfig, ConfigError, check_against_deepspeed
from ds_checkfree.recovery.rules import RecoveryAction as A
from ds_checkfree.recovery.rules import plan_recovery


def test_planner_reloads_only_the_stages_without_a_rule():
    kw = dict(has_checkpoint=True, checkpoint_restore="lost_stage")
    assert plan_recovery([2], 4, "off", **kw) == [A(2, "checkpoint_stage", ())]
    assert plan_recovery([0, 3], 4, "off", **kw) == [A(0, "checkpoint_stage", ()), A(3, "checkpoint_stage", ())]
    # CheckFree: stage 2 keeps its rule (no rollback anywhere), the first stage reloads alone
    assert plan_recovery([0, 2], 4, "checkfree", **kw) == [A(0, "checkpoint_stage", ()),
                                                          A(2, "weighted_average", (1, 3))]
    assert plan_recovery([0, 2], 4, "checkfree", has_checkpoint=True) == [A(0, "checkpoint", ()),
                                                                         A(2, "checkpoint", ())]


@pytest.mark.parametrize("kwargs,needle", [
    (dict(checkpoint_restore="lost_stage"), "no checkpoint_dir"),
    (dict(checkpoint_restore="lost_stage", mode="checkfree_plus", checkpoint_dir="x"), "tied"),
    (dict(checkpoint_restore="stage"), "must be one of"),
])
def test_config_errors(kwargs, needle):
    with pytest.raises(ConfigError) as err:
        CheckFreeConfig(**kwargs)
    assert needle in str(err.value) and "checkfree.checkpoint_restore" in str(err.value)
    with pytest.raises(ConfigError, match="fp32 masters"):
        check_against_deepspeed(CheckFreeConfig(checkpoint_restore="lost_stage", checkpoint_dir="x"),
                                {"bf16": {"enabled": True}})


def _dump(d, step, stage, tag):
    return torch.load(d / f"step{step}_stage{stage}_dp0_{tag}.pt", weights_only=False)


def test_lost_stage_reloads_its_stale_state_while_the_others_go_on(tmp_path):
    """Saves after steps 0, 3, 6; stage 2 lost at 5 and stage 0 at 6 each reload the step-3
    checkpoint's weights and Adam state; nobody else moves, every step runs once."""
    cfg = write_config(tmp_path / "ds.json", mode="off", checkpoint_every=3, checkpoint_dir=str(tmp_path / "ck"),
                       checkpoint_restore="lost_stage", storage_bandwidth_mb_s=100.0)
    dumps, out = tmp_path / "dumps", tmp_path / "out"
    run_job("deepspeed", 4, "launch/train.py",
            ["--deepspeed_config", str(cfg), "--model", "tiny", "--output_dir", str(out), "--eval_every", "0",
             "--steps", "7", "--fail_at", "2:5", "--fail_at", "0:6", "--dump_recovery_dir", str(dumps)])
    records = read_metrics(out)
    assert [r["step"] for r in steps_of(records)] == list(range(1, 8))
    assert not events_of(records, "checkpoint_load")  # no rollback: only the lost stages reloaded
    rec = events_of(records, "recovery")
    assert [(r["step"], r["stage"], r["method"], r["restore"], r["checkpoint_step"], r["staleness_steps"])
            for r in rec] == [(5, 2, "checkpoint_stage", "lost_stage", 3, 1),
                              (6, 0, "checkpoint_stage", "lost_stage", 3, 2)]
    assert all(r["bytes"] > 0 and r["charged_s"] == pytest.approx(r["bytes"] / 1e8, abs=1e-6) and r["lr_scale"] == 1.0
               for r in rec)
    for step, stage in ((5, 2), (6, 0)):
        saved, new, before = _dump(dumps, 3, stage, "checkpoint"), _dump(dumps, step, stage, "after"), \
            _dump(dumps, step, stage, "before")
        assert all(torch.equal(new["state"][k], saved["state"][k]) for k in saved["state"])
        assert not all(torch.equal(before["state"][k], saved["state"][k]) for k in saved["state"])
        opt_new, opt_saved = new["optimizer_state_dict"]["state"], saved["optimizer_state_dict"]["state"]
        assert opt_new.keys() == opt_saved.keys() and len(opt_new) > 0
        assert all(torch.equal(opt_new[i]["exp_avg"], opt_saved[i]["exp_avg"]) for i in opt_new)
    # the neighbours of stage 2 kept going untouched
    for stage in (1, 3):
        b, a = _dump(dumps, 5, stage, "before"), _dump(dumps, 5, stage, "after")
        assert all(torch.equal(b["state"][k], a["state"][k]) for k in b["state"])
