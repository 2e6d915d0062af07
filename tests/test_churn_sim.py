"""The churn simulator's logic (``benchmarks/churn_sim.py``): pure python, no processes."""
from __future__ import annotations

import itertools
import math
import random

import pytest

from benchmarks.churn_sim import (Outcome, PhaseModel, SimConfig, hazard_per_s, lost_columns, monte_carlo,
                                  per_iteration_survival, predicted_recovery, simulate, step_failure_probability)

#: every phase a constant: detection 0.1 s, each later phase 0.2 s (downtime 1.1 s, re-form 0.8 s)
FLAT = PhaseModel.constant({"detection_s": 0.1, **{p: 0.2 for p in (
    "teardown_s", "agreement_s", "data_plane_s", "engine_rebuild_s", "rematerialise_s")}})


def run(cfg: SimConfig, schedule, seed: int = 0) -> Outcome:
    return simulate(cfg, FLAT, random.Random(seed), schedule=schedule, trace=True)


def test_hazard_matches_the_papers_per_iteration_probability():
    h, step = 0.1, 68.4
    assert 1 - math.exp(-hazard_per_s(h) * 3600) == pytest.approx(h)
    assert step_failure_probability(h, step) == pytest.approx(1 - math.exp(-hazard_per_s(h) * step))
    assert step_failure_probability(0.1, 68.4) == pytest.approx(0.002, rel=0.01)  # the reference's 500m_10 preset
    with pytest.raises(ValueError, match="e.g. 0.1 for 10 %/h"):
        hazard_per_s(10)


def test_no_failures_means_full_goodput():
    out = simulate(SimConfig(stages=4, rate_per_hour=0.0, horizon_s=1000), FLAT)
    assert (out.goodput, out.survived, out.failures, out.wall_s) == (1.0, True, 0, 1000)


def test_one_crash_costs_the_step_in_flight_and_the_downtime():
    cfg = SimConfig(stages=4, spares=1, step_s=2.0, horizon_s=1000, rate_per_hour=0.0)
    out = run(cfg, [(100.0, 1, False)], seed=3)
    partial = random.Random(3).random() * 2.0  # the simulator's first draw: where in the step it hit
    assert out.survived and out.failures == 1 and out.recoveries == 1
    assert out.goodput == pytest.approx((1000 - partial - 1.1) / 1000)
    # the one-event prediction uses the same accounting: downtime + the redone step
    assert predicted_recovery(FLAT, cfg.ranks, 2.0) == pytest.approx(1.1 + 2.0)


def test_a_second_loss_inside_the_window_costs_a_reagreement_not_a_second_recovery():
    cfg = SimConfig(stages=6, spares=2, step_s=1.0, horizon_s=1000, rate_per_hour=0.0)
    out = run(cfg, [(100.0, 1, False), (100.5, 3, False)])
    assert out.recoveries == 1 and out.failures == 2 and out.survived
    apart = run(cfg, [(100.0, 1, False), (200.0, 3, False)])
    assert apart.recoveries == 2
    assert predicted_recovery(FLAT, 8, 1.0, second_after_s=0.5) == pytest.approx(0.5 + 0.1 + 0.8 + 1.0)
    assert predicted_recovery(FLAT, 8, 1.0, second_after_s=1.5) == pytest.approx(1.5 + 1.1 + 1.0)  # in the redo


def test_adjacent_stages_lost_together_stop_or_roll_back():
    cfg = SimConfig(stages=6, spares=2, step_s=1.0, horizon_s=1000, rate_per_hour=0.0)
    adjacent = [(100.0, 2, False), (100.2, 3, False)]
    out = run(cfg, adjacent)
    assert not out.survived and "[2, 3]" in out.stop_reason and out.wall_s < 110
    cfg.fallback = "checkpoint"
    out = run(cfg, adjacent)
    assert out.survived and out.rollbacks == 1
    assert run(SimConfig(stages=6, spares=2, rate_per_hour=0.0), [(100.0, 1, False), (100.2, 3, False)]).survived


def test_a_stage_with_a_live_replica_is_never_lost():
    cfg = SimConfig(stages=4, replicas=2, spares=2, rate_per_hour=0.0, horizon_s=1000)
    # replica 0 of stages 1 and 2 at once: both have a live replica (an exact copy), nothing adjacent is lost
    assert lost_columns({2, 4}, 2) == set() and run(cfg, [(100.0, 2, False), (100.1, 4, False)]).survived
    assert lost_columns({2, 3, 5}, 2) == {1}


def test_edge_stages_follow_the_codes_rules():
    plain = run(SimConfig(stages=4, spares=1, rate_per_hour=0.0), [(100.0, 0, False)])
    assert not plain.survived and "[0]" in plain.stop_reason
    assert run(SimConfig(stages=4, spares=1, mode="checkfree_plus", rate_per_hour=0.0), [(100.0, 0, False)]).survived
    paper = SimConfig(stages=6, layout="paper", rate_per_hour=0.0)
    assert paper.failing_slots() == [1, 2, 3, 4]  # the embedding's and the head's stages never fail


def test_out_of_spares_the_job_waits_for_a_joiner_or_stops():
    cfg = SimConfig(stages=4, spares=0, rate_per_hour=0.0, horizon_s=1000, join_wait_s=60.0)
    out = run(cfg, [(100.0, 1, False)])
    assert not out.survived and out.waits_for_joiners == 1 and "joiner" in out.stop_reason
    assert out.wall_s == pytest.approx(100.0 + 1.1 + 60.0)
    joined = SimConfig(stages=4, spares=0, rate_per_hour=0.0, horizon_s=100000, joins_per_hour=3600.0,
                       join_latency_s=5.0, max_spares=0)
    out = run(joined, [(100.0, 1, False)])
    assert out.survived and out.waits_for_joiners == 1


def test_an_idle_spare_lost_interrupts_nothing_but_leaves_none():
    cfg = SimConfig(stages=4, spares=1, rate_per_hour=0.0, horizon_s=1000, join_wait_s=10.0)
    out = run(cfg, [(50.0, "spare", False)])
    assert out.survived and out.failures == 0 and out.goodput == 1.0
    out = run(cfg, [(50.0, "spare", False), (100.0, 1, False)])
    assert not out.survived and out.waits_for_joiners == 1


def test_a_stall_is_seen_after_the_heartbeat_timeout():
    cfg = SimConfig(stages=4, spares=1, rate_per_hour=0.0, horizon_s=1000, heartbeat_timeout_s=10.0, step_s=1.0)
    crash, stall = run(cfg, [(100.0, 1, False)], seed=1), run(cfg, [(100.0, 1, True)], seed=1)
    assert (crash.goodput - stall.goodput) * 1000 == pytest.approx(10.0)


def test_the_phase_model_goes_through_the_measured_medians_and_extends_their_trend():
    rows = [{"ranks": n, "detection_s": 0.05, "teardown_s": 0.01 + 0.002 * n + noise, "agreement_s": 0.3 - 0.001 * n,
             "data_plane_s": 0.01, "engine_rebuild_s": 0.05 + 0.01 * n, "rematerialise_s": 0.02}
            for n in (5, 9, 17, 33) for noise in (-0.001, 0.0, 0.05)]  # the median ignores the outlier
    m = PhaseModel.fit(rows)
    assert m.phase("teardown_s", 9) == pytest.approx(0.028)
    assert m.phase("teardown_s", 13) == pytest.approx(0.01 + 0.002 * 13)  # between two sizes
    assert m.phase("engine_rebuild_s", 1001) == pytest.approx(0.05 + 0.01 * 1001)  # beyond: the medians' slope
    assert m.phase("teardown_s", 2) == m.phase("teardown_s", 5)  # below: the smallest size's
    assert m.phase("agreement_s", 1000) == pytest.approx(0.3 - 0.033)  # shrinking with size is no trend
    assert m.downtime(5) == pytest.approx(0.05 + 0.02 + 0.295 + 0.01 + 0.1 + 0.02)
    with pytest.raises(ValueError, match="recovery_scaling"):
        PhaseModel.fit([])


def test_per_iteration_survival_matches_enumeration():
    p = 0.3
    for blocks in (1, 2, 3, 5):
        ok = sum(p ** sum(bits) * (1 - p) ** (blocks - sum(bits))
                 for bits in itertools.product((0, 1), repeat=blocks)
                 if not any(a and b for a, b in zip(bits, bits[1:])))
        assert per_iteration_survival(blocks, p, 3) == pytest.approx(ok ** 3)


def test_monte_carlo_counts_failures_at_the_configured_rate():
    cfg = SimConfig(stages=10, replicas=2, spares=0, rate_per_hour=0.3, mode="checkfree_plus", horizon_s=200 * 3600,
                    joins_per_hour=1000.0, join_latency_s=1.0, max_spares=0, step_s=0.5)
    r = monte_carlo(cfg, FLAT, runs=4, seed=1)
    expected = 20 * hazard_per_s(0.3) * 3600  # failing nodes x hazard (the spare pool stays empty)
    assert r["failures_per_h"] == pytest.approx(expected, rel=0.1)
    assert r["survival"] == 1.0 and 0.99 < r["goodput"] < 1.0


def test_bad_configurations_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=">= 3 stages"):
        SimConfig(stages=2)
    with pytest.raises(ValueError, match="choose one of"):
        SimConfig(stages=4, fallback="pray")
    with pytest.raises(ValueError, match="runs must be >= 2"):
        monte_carlo(SimConfig(stages=4), FLAT, runs=1)
