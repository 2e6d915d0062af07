"""Per-stage gradient clipping (issue #11 item 6): ``checkfree.clip_scope``."""
from __future__ import annotations

import pytest

from conftest import read_metrics, run_job, steps_of, write_config
from ds_checkfree.config.checkfree import CheckFreeConfig, ConfigError, check_against_deepspeed

CLIP = 0.05  # well below the tiny model's gradient norms, so every stage is clipped


@pytest.mark.parametrize("ds,needle", [
    ({}, "gradient_clipping = 0"),
    ({"gradient_clipping": 1.0, "bf16": {"enabled": True}}, "bypass"),
    ({"gradient_clipping": 1.0, "zero_optimization": {"stage": 1}}, "bypass"),
])
def test_stage_scope_refusals(ds, needle):
    with pytest.raises(ConfigError) as err:
        check_against_deepspeed(CheckFreeConfig(clip_scope="stage"), ds)
    assert needle in str(err.value) and "checkfree.clip_scope" in str(err.value)
    check_against_deepspeed(CheckFreeConfig(), ds)  # the default scope needs nothing


def _norms(tmp_path, scope):
    cfg = write_config(tmp_path / f"{scope}.json", clip_scope=scope, norm_scope="stage", ds_gradient_clipping=CLIP)
    out = tmp_path / scope
    run_job("deepspeed", 4, "launch/train.py", ["--deepspeed_config", str(cfg), "--model", "tiny", "--steps", "3",
                                                "--eval_every", "0", "--output_dir", str(out)])
    return [(r["grad_norms_pre_clip"], r["grad_norms"], r["loss"]) for r in steps_of(read_metrics(out))]


def test_stage_scope_clips_each_stage_to_the_clip_value(tmp_path):
    """Each stage's post-clip norm (the norm recovery weighs by) is its own norm clipped at
    gradient_clipping, not one pipeline-wide factor. (Global scope keeps DeepSpeed's common
    factor: checked on the default-config run of tests/test_recovery.py.)"""
    stage = _norms(tmp_path, "stage")
    for pre, post, _ in stage:
        assert all(p > CLIP for p in pre)
        assert all(q <= CLIP * (1 + 1e-9) for q in post)  # every stage at most the clip value ...
        assert post == pytest.approx([CLIP * p / (p + 1e-6) for p in pre], rel=1e-9)  # ... each by its own norm
        ratios = [q / p for p, q in zip(pre, post)]
        assert max(ratios) > 1.2 * min(ratios)  # not one common factor
