"""Data parallelism x pipeline: the pure recovery plan for lost (stage, replica) pairs, the
failure spec that names one replica, and its validation."""
from __future__ import annotations

import pytest

from ds_checkfree.config.checkfree import CheckFreeConfig, ConfigError, format_fail_entry
from ds_checkfree.config.deepspeed_checks import validate_world
from ds_checkfree.recovery.injection import Failure, FailurePlan, parse_fail_at
from ds_checkfree.recovery.rules import RecoveryAction, UnrecoverableFailure, plan_recovery, plan_replicated_recovery


def test_a_replica_with_a_live_twin_is_copied_from_it():
    plan = plan_replicated_recovery([(1, 1)], num_stages=4, dp_size=2, mode="checkfree")
    assert plan == [RecoveryAction(1, "replica", (1,), replica=1, source_replica=0)]
    # the twin is the lowest live replica; several replicas of one stage copy from it
    plan = plan_replicated_recovery([(2, 0), (2, 2)], num_stages=4, dp_size=4, mode="checkfree")
    assert plan == [RecoveryAction(2, "replica", (2,), replica=0, source_replica=1),
                    RecoveryAction(2, "replica", (2,), replica=2, source_replica=1)]


@pytest.mark.parametrize("mode", ["off", "checkfree", "checkfree_plus"])
def test_a_replica_copy_needs_no_rule_even_for_edge_stages(mode):
    # stage 0 has no CheckFree rule, but its live twin makes the loss exact to repair
    plan = plan_replicated_recovery([(0, 0), (3, 1)], num_stages=4, dp_size=2, mode=mode)
    assert [(a.stage, a.method, a.replica, a.source_replica) for a in plan] == [(0, "replica", 0, 1),
                                                                                (3, "replica", 1, 0)]


def test_a_whole_column_uses_the_checkfree_rule():
    plan = plan_replicated_recovery([(2, 0), (2, 1)], num_stages=4, dp_size=2, mode="checkfree")
    assert plan == plan_recovery([2], 4, "checkfree") == [RecoveryAction(2, "weighted_average", (1, 3))]
    assert plan_replicated_recovery([(0, 0), (0, 1)], 4, 2, "checkfree_plus") == [RecoveryAction(0, "copy", (1,))]


def test_copies_run_before_a_column_rebuild_next_to_them():
    # stage 1 fully lost, stage 2 lost one replica: stage 2 is restored first, then it is a source
    plan = plan_replicated_recovery([(1, 0), (1, 1), (2, 1)], num_stages=4, dp_size=2, mode="checkfree")
    assert plan == [RecoveryAction(2, "replica", (2,), replica=1, source_replica=0),
                    RecoveryAction(1, "weighted_average", (0, 2))]


def test_dp1_is_the_plain_plan():
    for lost in ([1], [1, 3]):
        pairs = [(s, 0) for s in lost]
        assert plan_replicated_recovery(pairs, 5, 1, "checkfree") == plan_recovery(lost, 5, "checkfree")


def test_unrecoverable_columns_still_stop_or_roll_back():
    with pytest.raises(UnrecoverableFailure, match="adjacent"):
        plan_replicated_recovery([(1, 0), (1, 1), (2, 0), (2, 1)], 4, 2, "checkfree")
    with pytest.raises(UnrecoverableFailure, match="stage 0 is the first stage"):
        plan_replicated_recovery([(0, 0), (0, 1), (2, 1)], 4, 2, "checkfree")
    # with a checkpoint, everyone rolls back: the copies are moot
    plan = plan_replicated_recovery([(0, 0), (0, 1), (2, 1)], 4, 2, "checkfree", has_checkpoint=True)
    assert plan == [RecoveryAction(0, "checkpoint", ())]


@pytest.mark.parametrize("lost,dp,needle", [
    ([(1, 2)], 2, "replica 2 of stage 1 is out of range"),
    ([(1, -1)], 2, "out of range"),
    ([(7, 0)], 2, "out of range"),
])
def test_bad_pairs_are_rejected(lost, dp, needle):
    with pytest.raises(ValueError, match=needle):
        plan_replicated_recovery(lost, 4, dp, "checkfree")
    with pytest.raises(ValueError, match="dp_size"):
        plan_replicated_recovery([(1, 0)], 4, 0, "checkfree")


# -------------------------------------------------------------- the failure spec
def test_fail_at_names_a_replica():
    assert parse_fail_at("2:100") == (2, 100)              # every replica, as before
    assert parse_fail_at("2.1:100") == (2, 100, 1)
    for bad in ("2.1.0:5", "2.-1:5", "a.1:5", "2.:5"):
        with pytest.raises(ValueError, match="STAGE.REPLICA:STEP"):
            parse_fail_at(bad)
    plan = FailurePlan(4, fail_at=["1.1:3", "2:4", "3.0:5", "3.1:5", (0, 6, 1)])
    assert plan.failures_at(3) == [Failure(3, 1, "fail_at", 1)]
    assert plan.failures_at(4) == [Failure(4, 2, "fail_at")]
    assert plan.failures_at(5) == [Failure(5, 3, "fail_at", 0), Failure(5, 3, "fail_at", 1)]
    assert plan.failures_at(6) == [Failure(6, 0, "fail_at", 1)]
    # a whole-stage entry covers every replica
    assert FailurePlan(4, fail_at=["1.1:3", "1:3"]).failures_at(3) == [Failure(3, 1, "fail_at")]


def test_config_parses_validates_and_round_trips_replica_entries():
    cfg = CheckFreeConfig.from_dict({"fail_at": ["1.1:3", "2:4", [3, 5]]})
    assert cfg.fail_at == [(1, 3, 1), (2, 4), (3, 5)]
    assert cfg.to_dict()["fail_at"] == ["1.1:3", "2:4", "3:5"]
    assert CheckFreeConfig.from_dict(cfg.to_dict()).fail_at == cfg.fail_at
    assert format_fail_entry((1, 3, 1)) == "1.1:3"
    with pytest.raises(ConfigError, match=r"checkfree.fail_at\[0\] = '1.x:3'.*STAGE.REPLICA:STEP"):
        CheckFreeConfig.from_dict({"fail_at": ["1.x:3"]})
    with pytest.raises(ConfigError, match="replica -1 is negative"):
        CheckFreeConfig.from_dict({"fail_at": ["1.-1:3"]})
    # the replica must exist: 8 ranks over 4 stages = 2 replicas
    assert validate_world(cfg, 8, 8, 4) == 2
    bad = CheckFreeConfig.from_dict({"fail_at": ["1.2:3"]})
    with pytest.raises(ConfigError, match=r"replica 2 does not exist.*2 data-parallel replica.*use a replica in 0..1, "
                                          r"or write 1:3"):
        validate_world(bad, 8, 8, 4)
    with pytest.raises(ConfigError, match="replica 1 does not exist"):
        validate_world(CheckFreeConfig.from_dict({"fail_at": ["1.1:3"]}), 4, 8, 4)
