import json
import math

import pytest

from ds_checkfree.recovery.injection import (
    Failure,
    FailurePlan,
    parse_fail_at,
    step_failure_probability,
)


# ---------------------------------------------------------------- probability
@pytest.mark.parametrize("rate", [5.0, 10.0, 16.0, 33.0])
def test_probability_matches_paper_formula(rate):
    t = 2.5
    expected = 1 - (1 - rate / 100) ** (t / 3600)
    assert step_failure_probability(rate, t) == pytest.approx(expected, rel=1e-15)


def test_probability_one_hour_step_is_the_hourly_rate():
    for rate in (5.0, 10.0, 16.0):
        assert step_failure_probability(rate, 3600.0) == pytest.approx(rate / 100, rel=1e-12)


def test_probability_hand_values():
    # 10%/h with 36 s steps: 1 - 0.9**0.01
    assert step_failure_probability(10.0, 36.0) == pytest.approx(1 - 0.9 ** 0.01, rel=1e-15)
    assert step_failure_probability(10.0, 36.0) == pytest.approx(0.0010530, abs=1e-7)
    # compounding over an hour gives back the hourly rate
    p = step_failure_probability(16.0, 1.0)
    assert 1 - (1 - p) ** 3600 == pytest.approx(0.16, rel=1e-9)
    assert step_failure_probability(0.0, 10.0) == 0.0


def test_probability_monotone():
    rates = [0.0, 1.0, 5.0, 10.0, 16.0, 33.0, 99.0]
    ps = [step_failure_probability(r, 10.0) for r in rates]
    assert all(a < b for a, b in zip(ps, ps[1:]))
    times = [0.1, 1.0, 10.0, 100.0, 3600.0]
    ps = [step_failure_probability(10.0, t) for t in times]
    assert all(a < b for a, b in zip(ps, ps[1:]))


@pytest.mark.parametrize("rate,t", [(-1, 1), (100, 1), (150, 1), (10, 0), (10, -1), (math.nan, 1), (10, math.inf)])
def test_probability_rejects_bad_input(rate, t):
    with pytest.raises(ValueError):
        step_failure_probability(rate, t)


# ---------------------------------------------------------------- parse_fail_at
def test_parse_fail_at():
    assert parse_fail_at("2:100") == (2, 100)
    assert parse_fail_at(" 0:1 ") == (0, 1)


@pytest.mark.parametrize("text", ["2", "a:b", "1:0", "-1:5", "1:2:3", ""])
def test_parse_fail_at_rejects(text):
    with pytest.raises(ValueError) as e:
        parse_fail_at(text)
    assert repr(text) in str(e.value)
    assert "STAGE:STEP" in str(e.value)


def test_failure_is_ordered_and_validates_cause():
    assert Failure(1, 2, "rate") < Failure(2, 0, "rate")
    assert Failure(3, 0, "rate") < Failure(3, 1, "fail_at")
    with pytest.raises(ValueError):
        Failure(1, 0, "meteor")


# ---------------------------------------------------------------- plan
def _rate_plan(seed=0, stages=4):
    # a high rate so a short window has failures
    return FailurePlan(stages, rate_percent_per_hour=99.0, step_seconds=600.0, seed=seed)


def test_fail_at_explicit():
    plan = FailurePlan(4, fail_at=["2:5", (1, 5), "3:7"])
    assert plan.failures_at(5) == [Failure(5, 1, "fail_at"), Failure(5, 2, "fail_at")]
    assert plan.failures_at(6) == []
    assert plan.failures_at(7) == [Failure(7, 3, "fail_at")]
    with pytest.raises(ValueError):
        FailurePlan(4, fail_at=["4:1"])


def test_rate_plan_produces_failures_at_roughly_the_rate():
    plan = FailurePlan(4, rate_percent_per_hour=50.0, step_seconds=360.0, seed=1)
    p = step_failure_probability(50.0, 360.0)
    n = len(plan.failures_between(1, 2000))
    assert n == pytest.approx(p * 2000 * 4, rel=0.15)


def test_same_seed_same_failures_independent_of_query_order():
    a, b = _rate_plan(seed=7), _rate_plan(seed=7)
    forward = [a.failures_at(s) for s in range(1, 101)]
    backward = {s: b.failures_at(s) for s in range(100, 0, -1)}
    assert forward == [backward[s] for s in range(1, 101)]
    assert sum(map(len, forward)) > 0
    # querying again (and a single step in isolation) changes nothing
    assert a.failures_at(37) == forward[36]
    assert _rate_plan(seed=7).failures_at(37) == forward[36]
    assert a.failures_between(1, 100) == [f for fs in forward for f in fs]


def test_rate_draw_of_a_stage_does_not_depend_on_other_stages():
    # the (step, stage) draw depends only on (seed, step, stage): the stages present in
    # a 4-stage plan are the same in an 8-stage plan with the same seed
    four = {(f.step, f.stage) for f in _rate_plan(seed=3, stages=4).failures_between(1, 200)}
    eight = {(f.step, f.stage) for f in _rate_plan(seed=3, stages=8).failures_between(1, 200) if f.stage < 4}
    assert four == eight


def test_different_seeds_differ():
    a = _rate_plan(seed=1).failures_between(1, 200)
    b = _rate_plan(seed=2).failures_between(1, 200)
    assert a and b and a != b


def test_explicit_merges_with_rate_and_wins_duplicates():
    base = _rate_plan(seed=5).failures_between(1, 50)
    hit = base[0]
    miss_step = next(s for s in range(1, 51) if all(f.step != s or f.stage != 0 for f in base))
    plan = FailurePlan(4, fail_at=[f"{hit.stage}:{hit.step}", f"0:{miss_step}"],
                       rate_percent_per_hour=99.0, step_seconds=600.0, seed=5)
    merged = plan.failures_between(1, 50)
    assert len(merged) == len(base) + 1
    at_hit = [f for f in merged if (f.step, f.stage) == (hit.step, hit.stage)]
    assert at_hit == [Failure(hit.step, hit.stage, "fail_at")]
    assert Failure(miss_step, 0, "fail_at") in merged
    assert merged == sorted(merged)


def test_counts_once_per_step():
    plan = FailurePlan(4, fail_at=["1:3", "2:3", "0:9"])
    assert plan.counts() == {"fail_at": 0, "rate": 0, "schedule_file": 0, "process_lost": 0}
    plan.failures_at(3)
    plan.failures_at(3)
    plan.failures_between(1, 20)  # a preview: not counted
    assert plan.counts()["fail_at"] == 2
    plan.failures_at(9)
    assert plan.counts()["fail_at"] == 3
    plan.record_process_lost(4, 1)
    plan.record_process_lost(4, 1)
    assert plan.counts()["process_lost"] == 1


def test_counts_rate():
    plan = _rate_plan(seed=11)
    expected = len(plan.failures_between(1, 30))
    for s in range(1, 31):
        plan.failures_at(s)
    for s in range(1, 31):
        plan.failures_at(s)
    assert expected > 0
    assert plan.counts()["rate"] == expected


def test_save_and_replay(tmp_path):
    plan = FailurePlan(4, fail_at=["1:2"], rate_percent_per_hour=99.0, step_seconds=600.0, seed=9)
    path = tmp_path / "sched.json"
    saved = plan.save(path, 40)
    data = json.loads(path.read_text())
    assert data["num_stages"] == 4 and data["seed"] == 9
    assert data["rate_percent_per_hour"] == 99.0 and data["step_seconds"] == 600.0
    assert len(data["failures"]) == len(saved) > 1
    assert plan.counts()["rate"] == 0  # saving is not handing out

    replay = FailurePlan(4, schedule_file=path)
    got = replay.failures_between(1, 40)
    assert [(f.step, f.stage) for f in got] == [(f.step, f.stage) for f in saved]
    assert {f.cause for f in got} == {"schedule_file"}
    assert replay.failures_between(41, 200) == []
    for s in range(1, 41):
        replay.failures_at(s)
    assert replay.counts()["schedule_file"] == len(saved)

    # explicit fail_at on top of a replay wins the duplicate and adds new ones
    both = FailurePlan(4, fail_at=["1:2", "0:45"], schedule_file=path)
    assert Failure(2, 1, "fail_at") in both.failures_at(2)
    assert both.failures_at(45) == [Failure(45, 0, "fail_at")]


def test_load_rejects_mismatch(tmp_path):
    path = tmp_path / "s.json"
    FailurePlan(4, fail_at=["3:1"]).save(path, 5)
    with pytest.raises(ValueError, match="num_stages"):
        FailurePlan(3, schedule_file=path)
    data = json.loads(path.read_text())
    data["failures"].append({"step": 2, "stage": 4, "cause": "rate"})
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="out of range"):
        FailurePlan(4, schedule_file=path)


def test_plan_validation():
    with pytest.raises(ValueError):
        FailurePlan(0)
    with pytest.raises(ValueError, match="step_seconds"):
        FailurePlan(4, rate_percent_per_hour=5.0)
    with pytest.raises(ValueError):
        FailurePlan(4, rate_percent_per_hour=100.0, step_seconds=1.0)
    with pytest.raises(ValueError):
        FailurePlan(4).failures_at(0)
