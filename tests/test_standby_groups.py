"""Idle copies of a member's groups (``ds_checkfree.elastic.standby_groups``): the rule that
decides, identically on every member of a set, whether a recovery keeps a copy, and a real
copy formed on a background thread serving the next generation. The end-to-end guard (a
SIGKILL at 4 stages x 4 replicas, after which only the lost slot's groups form anew) is
``test_wake_blocked.test_4_stages_x_4_replicas_recover_from_a_sigkill_without_reaching_a_timeout``."""
from __future__ import annotations

import json

from conftest import run_job

from ds_checkfree.elastic.standby_groups import (Copies, StandbyGroups, promotable, read_rebuild_lines, ready_key,
                                                 rebuild_line, set_key)

HOLDERS = {0: 10, 1: 11, 2: 12, 3: 13}  # slot -> member id


def test_a_copy_serves_the_next_generation_when_its_members_stayed_and_all_marked_it_ready():
    assert promotable((0, 2), 4, 5, HOLDERS, dict(HOLDERS), ready={0, 2})
    assert not promotable((0, 2), 4, 6, HOLDERS, dict(HOLDERS), ready={0, 2})  # skipped a generation
    assert not promotable((0, 2), 4, 4, HOLDERS, dict(HOLDERS), ready={0, 2})
    assert not promotable((0, 2), 4, 5, HOLDERS, dict(HOLDERS), ready={0})  # slot 2's member never marked it
    assert not promotable((0, 1), 4, 5, HOLDERS, {**HOLDERS, 1: 99}, ready={0, 1})  # slot 1 lost: a spare has it
    assert not promotable((0, 5), 4, 5, HOLDERS, dict(HOLDERS), ready={0, 5})  # slot 5 had no holder


def test_keys_name_the_set_and_the_generation():
    assert set_key((1, 5, 9)) == "1-5-9"
    assert ready_key(3, 7) == "standby/gen3/ready/7"


def test_a_members_rebuild_line_reads_back_among_other_log_lines():
    log = "\n".join([
        "[rank 3 stage 0] " + rebuild_line(2, 1, 2, [(1, 5, 9, 13)], 0.03125),
        "[rank 9 stage 2] step 7: data plane error (Connection reset by peer); agreeing on the survivors",
        "[rank 16 stage 0] " + rebuild_line(2, 0, 0, [(0, 1), (0,)], 0.5),
        "[rank 4 stage 1] " + rebuild_line(3, 4, 3, [], 0.0)])
    assert read_rebuild_lines(log) == [
        {"generation": 2, "slot": 1, "kept": 2, "formed": [(1, 5, 9, 13)], "seconds": 0.0312},
        {"generation": 2, "slot": 0, "kept": 0, "formed": [(0, 1), (0,)], "seconds": 0.5},
        {"generation": 3, "slot": 4, "kept": 3, "formed": [], "seconds": 0.0}]


def test_take_hands_each_copy_over_once_and_only_to_the_next_generation():
    groups = StandbyGroups(open_client=None, keep=None, timeout_s=1.0)
    copies = Copies(generation=2, slot=0, holders=dict(HOLDERS), made={(0, 1): "g01", (0, 2): "g02"},
                    stores={(0, 1): "s01", (0, 2): "s02"}, inodes={"socket:[1]"}, ready=True)
    groups._copies, groups._started_for = copies, 2
    asked = []

    def all_ready(generation, slots):
        asked.append((generation, tuple(slots)))
        return slots

    now = {**HOLDERS, 1: 99}  # slot 1 lost
    assert groups.take((0, 2), 4, now, all_ready) is None  # not the generation after the copies'
    assert groups.take((0, 1), 3, now, all_ready) is None  # holds the lost slot
    assert groups.take((0, 2), 3, now, all_ready) == ("g02", "s02", {"socket:[1]"})
    assert groups.take((0, 2), 3, now, all_ready) is None  # handed over already
    assert asked == [(2, (0, 1)), (2, (0, 2))]
    groups.drop()
    assert groups.take((0, 1), 3, dict(HOLDERS), all_ready) is None


def test_a_copy_formed_on_a_thread_serves_the_next_generation(tmp_path):
    """Real gloo groups: the copy forms on a background thread while generation 0 runs a
    collective, stays out of torch's registry, survives generation 0's teardown, and once
    registered in generation 1 serves all-reduce, broadcast and rank queries."""
    out = tmp_path / "copy"
    run_job("torchrun", 3, "tests/workers/standby_group_worker.py", [str(out)], timeout=180)
    r = [json.loads((tmp_path / f"copy.{rank}.json").read_text()) for rank in range(3)]
    for seen in r:
        assert seen["default_all_reduce"] == 6.0 and seen["gen1_all_reduce"] == 3.0
        assert seen["groups_gen0"] == 1  # the copy was never in generation 0's registry
    for rank in (0, 1):
        assert r[rank]["registered_while_forming"] == 1
        assert r[rank]["pair_all_reduce"] == 3.0 and r[rank]["broadcast"] == 1.0
        assert (r[rank]["group_rank"], r[rank]["group_size"], r[rank]["global_of_1"]) == (rank, 2, 1)
