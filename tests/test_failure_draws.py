"""Failure draws per executed step and the reference's rate presets (issue #11 item 7)."""
from __future__ import annotations

import json

import pytest

from conftest import events_of, read_metrics, run_job, steps_of, write_config
from ds_checkfree.config.checkfree import CheckFreeConfig, ConfigError
from ds_checkfree.config.modes import RATE_PRESETS
from ds_checkfree.recovery.injection import FailurePlan, hourly_rate_percent, rate_label, step_failure_probability
from ds_checkfree.recovery.driver import RecoveryDriver
from ds_checkfree.recovery.logical import LogicalFailures


def test_presets_are_the_reference_probabilities():
    assert {k: v[0] for k, v in RATE_PRESETS.items()} == {
        "500m_5": 0.0009, "500m_10": 0.002, "500m_16": 0.004, "500m_33": 0.01,
        "124m_10": 0.0006, "124m_16": 0.001, "1.5b_10": 0.004, "1.5b_16": 0.008}
    plan = FailurePlan(4, preset="500m_10")
    assert plan.step_probability == 0.002
    # labelled at the step time the reference's own pair implies: 10 %/h there
    assert plan.label["percent_per_hour"] == pytest.approx(10.0) and plan.label["step_seconds_from"] == "preset"
    at_300 = rate_label(preset="500m_10", step_seconds=300.0)
    assert at_300["per_step_probability"] == 0.002
    assert step_failure_probability(at_300["percent_per_hour"], 300.0) == pytest.approx(0.002, rel=1e-12)
    assert hourly_rate_percent(step_failure_probability(10.0, 36.0), 36.0) == pytest.approx(10.0)
    p = FailurePlan(4, step_probability=0.01, step_seconds=60.0)
    assert p.label == {"per_step_probability": 0.01, "percent_per_hour": pytest.approx(hourly_rate_percent(0.01, 60)),
                       "step_seconds": 60.0, "step_seconds_from": "assumed_step_seconds",
                       "source": "failure_probability"}
    with pytest.raises(ValueError, match="one of"):
        FailurePlan(4, rate_percent_per_hour=5.0, step_seconds=1.0, preset="500m_5")


@pytest.mark.parametrize("kwargs,needle", [
    (dict(failure_preset="500m_7"), 'did you mean "500m_5"'),
    (dict(failure_probability=1.0, assumed_step_seconds=1.0), "[0, 1)"),
    (dict(failure_probability=0.01), "assumed_step_seconds = None"),
    (dict(failure_rate=5.0, assumed_step_seconds=1.0, failure_preset="500m_5"), "one rate source"),
    (dict(failure_draws="executed_step", spares=1), "spare"),
    (dict(failure_draws="per_step"), "must be one of"),
])
def test_rate_config_errors(kwargs, needle):
    with pytest.raises(ConfigError) as err:
        CheckFreeConfig(**kwargs)
    assert needle in str(err.value) and "Fix:" in str(err.value)


def test_executed_draws_follow_the_executed_step():
    logical = FailurePlan(4, step_probability=0.3, step_seconds=60.0, seed=5)
    executed = FailurePlan(4, step_probability=0.3, step_seconds=60.0, seed=5, draws="executed_step")
    for step, n in ((3, 3), (3, 9), (4, 11), (2, 17)):
        got = [(f.step, f.stage, f.executed) for f in executed.failures_at(step, executed=n)]
        assert got == [(step, f.stage, n) for f in logical.failures_at(n)]  # same draw key, the executed step
    assert [f.stage for f in logical.failures_at(3, executed=9)] == [f.stage for f in logical.failures_at(3)]
    # explicit fail_at entries stay on their logical step
    both = FailurePlan(4, fail_at=["1:3"], draws="executed_step")
    assert [f.stage for f in both.failures_at(3, executed=7)] == [1] and not both.failures_at(7, executed=3)


def _simulate(lf: LogicalFailures, steps: int, every: int):
    """The trainer's loop under a global rollback (mode off, a checkpoint every ``every`` steps)."""
    latest, step, events = 0, 1, []
    while step <= steps and lf.executed < 200:
        fails = lf.due(step)
        if fails:
            events += [(step, f.stage, f.executed) for f in fails]
            step = latest + 1
            continue
        latest = step if step % every == 0 else latest
        step += 1
    return events


def _plan(draws, seed, p=0.06):
    return FailurePlan(4, step_probability=p, step_seconds=60.0, seed=seed, draws=draws)


def _redone_fails(events):
    return any(a[:2] == b[:2] and a[2] != b[2] for a in events for b in events)


def test_a_redone_step_can_fail_again_only_with_executed_draws():
    seeds = [s for s in range(300)
             if _redone_fails(_simulate(LogicalFailures(_plan("executed_step", s), RecoveryDriver(None)), 8, 2))]
    assert seeds  # the executed-step model lets a redone step fail again ...
    for s in range(300):  # ... the logical-step model never does
        assert not _redone_fails(_simulate(LogicalFailures(_plan("logical_step", s), RecoveryDriver(None)), 8, 2))
    a = _simulate(LogicalFailures(_plan("executed_step", seeds[0]), RecoveryDriver(None)), 8, 2)
    assert a == _simulate(LogicalFailures(_plan("executed_step", seeds[0]), RecoveryDriver(None)), 8, 2)  # reproducible


def test_executed_schedule_file_round_trips(tmp_path):
    plan = _plan("executed_step", 4, p=0.2)
    path = tmp_path / "s.json"
    saved = plan.save(path, 30)
    data = json.loads(path.read_text())
    assert data["keyed_by"] == "executed_step" and data["rate"]["per_step_probability"] == 0.2
    replay = FailurePlan(4, schedule_file=path, draws="executed_step")
    for n in range(1, 31):
        assert [f.stage for f in replay.failures_at(1, executed=n)] == [f.stage for f in saved if f.step == n]


@pytest.mark.slow  # the draws themselves are unit-tested above; this runs a real rollback job; kept out of the default suite for time
def test_rollback_run_redraws_redone_steps_and_labels_the_rate(tmp_path):
    """Mode off with a global rollback: the job's failure events are exactly what the
    trainer's loop gives with the same plan, including a redone step failing again."""
    steps, every, p = 6, 2, 0.06
    seed = next(s for s in range(300) if _redone_fails(ev := _simulate(
        LogicalFailures(_plan("executed_step", s, p), RecoveryDriver(None)), steps, every)) and len(ev) <= 4)
    expected = _simulate(LogicalFailures(_plan("executed_step", seed, p), RecoveryDriver(None)), steps, every)
    cfg = write_config(tmp_path / "ds.json", mode="off", checkpoint_every=every, checkpoint_dir=str(tmp_path / "ck"),
                       failure_probability=p, assumed_step_seconds=60.0, failure_seed=seed,
                       failure_draws="executed_step")
    out = tmp_path / "out"
    run_job("deepspeed", 4, "launch/train.py", ["--deepspeed_config", str(cfg), "--model", "tiny", "--steps",
                                                str(steps), "--eval_every", "0", "--output_dir", str(out)])
    records = read_metrics(out)
    fails = events_of(records, "failure")
    assert [(f["step"], f["stage"], f["executed_step"]) for f in fails] == expected
    assert all(f["cause"] == "rate" and f["per_step_probability"] == p and f["rate_step_seconds"] == 60.0
               and f["percent_per_hour"] == pytest.approx(hourly_rate_percent(p, 60.0)) for f in fails)
    assert {ev["restore"] for ev in events_of(records, "checkpoint_load")} == {"global_rollback"}
    assert steps_of(records)[-1]["step"] == steps
    label = json.loads((out / "run.json").read_text())["failure_rate"]
    assert label["per_step_probability"] == p and label["percent_per_hour"] == pytest.approx(hourly_rate_percent(p, 60))
