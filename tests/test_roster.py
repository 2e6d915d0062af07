"""The coordinator's membership decisions (``membership.roster``), clock passed in, no processes."""
from __future__ import annotations

import pytest

from ds_checkfree.elastic.membership.roster import STOP_NO_REPLACEMENT, Plan, Roster


def ops(outs, op):
    return [o for o in outs if o.msg.get("op") == op]


def plan_of(outs) -> Plan:
    (out,) = ops(outs, "plan")
    return Plan.from_message(out.msg)


def started(num_stages=4, expect=5, join_wait_s=0.0, dead_after=10.0):
    """A roster past start-up: members 0..expect-1, stage s on member s, the rest spares."""
    r = Roster(num_stages, expect, dead_after=dead_after, startup_wait_s=30.0, join_wait_s=join_wait_s, now=0.0)
    for i in range(expect):
        mid, _ = r.hello(i, "h", 100 + i, "127.0.0.1", now=1.0)
        assert mid == i
    outs = []
    for i in range(expect):
        outs += r.checkin(i, 0, False, now=2.0, for_generation=1)
    return r, plan_of(outs)


def beat_all(r, now):
    for mid in list(r.members):
        r.beat(mid, now)


def test_start_up_gives_stage_s_to_rank_s_and_makes_the_rest_spares():
    r, plan = started()
    assert plan.generation == 1 and plan.fresh and plan.resume_step == 1 and plan.lost == []
    assert plan.roles == {0: 0, 1: 1, 2: 2, 3: 3, 4: None}


def test_start_up_waits_for_every_launched_process_then_starts_without_the_missing_one():
    r = Roster(4, 5, dead_after=10.0, startup_wait_s=30.0, join_wait_s=0.0, now=0.0)
    outs = []
    for i in (0, 1, 3, 4):  # rank 2 died during its imports and never said hello
        _, o = r.hello(i, "h", 100 + i, "a", now=1.0)
        outs += o + r.checkin(i, 0, False, now=1.5, for_generation=1)
    assert not ops(outs, "plan"), "started before the start-up wait was over"
    beat_all(r, 29.0)
    assert not ops(r.tick(29.0), "plan")
    beat_all(r, 30.5)
    plan = plan_of(r.tick(30.5))
    assert plan.fresh and plan.roles == {0: 0, 1: 1, 3: 3, 4: 2} and plan.replacements[2] == 4


def test_a_killed_stage_opens_a_round_and_the_spare_takes_it_with_the_lost_state_named():
    r, _ = started()
    outs = r.disconnected(2, now=5.0)
    assert ops(outs, "round")[0].to == [0, 1, 3, 4]
    outs = []
    for mid, steps in ((0, 8), (1, 8), (3, 7), (4, 0)):
        assert not ops(outs, "plan")
        outs += r.checkin(mid, steps, mid != 4, now=5.2, for_generation=2)
    plan = plan_of(outs)
    assert plan.generation == 2 and not plan.fresh
    assert plan.lost == [2] and plan.replacements == {2: 4} and plan.dead == [2] and plan.evicted == []
    assert plan.roles == {0: 0, 1: 1, 3: 3, 4: 2}
    assert plan.resume_step == 9  # the last collective split: the furthest survivor decides


def test_a_stale_check_in_does_not_open_a_new_round():
    r, _ = started()
    r.disconnected(2, now=5.0)
    outs = []
    for mid in (0, 1, 3, 4):
        outs += r.checkin(mid, 8, mid != 4, now=5.1, for_generation=2)
    assert plan_of(outs).generation == 2
    assert r.checkin(1, 8, True, now=5.2, for_generation=2) == []  # a duplicate arriving late
    assert r.round is None
    assert ops(r.checkin(1, 9, True, now=6.0, for_generation=3), "round")  # a real new failure


def test_a_silent_member_is_evicted_and_its_connection_closed():
    r, _ = started(dead_after=10.0)
    beat_all(r, 5.0)
    for mid in (0, 1, 3, 4):
        r.beat(mid, 14.0)
    outs = r.tick(15.5)  # member 2 (SIGSTOPped) last beat at 5.0
    (ev,) = ops(outs, "evicted")
    assert ev.to == [2] and ev.close and "no heartbeat" in ev.msg["why"]
    assert ops(outs, "round") and 2 not in r.members
    r.beat(2, 16.0)  # it wakes: nothing brings it back
    assert 2 not in r.members
    outs = []
    for mid in (0, 1, 3, 4):
        outs += r.checkin(mid, 12, mid != 4, now=16.0, for_generation=2)
    plan = plan_of(outs)
    assert plan.evicted == [2] and plan.replacements == {2: 4}
    done = ops(r.finished(0, now=20.0), "done")[0]
    assert done.msg["evicted"] == [{"id": 2, "host": "h", "pid": 102}]


def test_without_a_spare_the_lost_stage_waits_for_a_joiner():
    r, _ = started(expect=4, join_wait_s=60.0)
    r.disconnected(2, now=5.0)
    outs = []
    for mid in (0, 1, 3):
        outs += r.checkin(mid, 8, True, now=5.1, for_generation=2)
    assert not ops(outs, "plan") and not ops(outs, "stop")
    beat_all(r, 7.0)
    mid, outs = r.hello(None, "other-host", 555, "10.0.0.9", now=7.0)
    assert mid == 4 and ops(outs, "round")[0].to == [4]  # told to check in
    plan = plan_of(r.checkin(mid, 0, False, now=7.2, for_generation=2))
    assert plan.replacements == {2: 4} and plan.lost == [2] and plan.roles[4] == 2 and plan.hosts[4] == "other-host"
    # that joiner dies too: a second joiner replaces it (generation 3)
    r.disconnected(4, now=8.0)
    for m in (0, 1, 3):
        r.checkin(m, 9, True, now=8.1, for_generation=3)
    beat_all(r, 9.0)
    mid2, _ = r.hello(None, "h3", 556, "a", now=9.0)
    plan = plan_of(r.checkin(mid2, 0, False, now=9.1, for_generation=3))
    assert mid2 == 5 and plan.generation == 3 and plan.replacements == {2: 5} and plan.dead == [4]


def test_no_joiner_within_the_wait_stops_the_job_naming_the_stage():
    r, _ = started(expect=4, join_wait_s=20.0)
    r.disconnected(2, now=5.0)
    for mid in (0, 1, 3):
        r.checkin(mid, 8, True, now=5.1, for_generation=2)
    beat_all(r, 24.0)
    assert not ops(r.tick(24.0), "stop")
    beat_all(r, 25.5)
    (stop,) = ops(r.tick(25.5), "stop")
    assert stop.msg["reason"] == STOP_NO_REPLACEMENT and stop.msg["lost"] == [2] and stop.msg["dead"] == [2]
    assert stop.to == [0, 1, 3] and r.phase == "stopped"


def test_zero_join_wait_stops_at_once():
    r, _ = started(expect=4, join_wait_s=0.0)
    r.disconnected(1, now=5.0)
    outs = []
    for mid in (0, 2, 3):
        outs += r.checkin(mid, 8, True, now=5.1, for_generation=2)
    assert ops(outs, "stop")[0].msg["lost"] == [1]


def test_a_joiner_while_nothing_is_vacant_becomes_a_spare_without_a_round():
    r, _ = started(expect=4)
    mid, outs = r.hello(None, "h", 1, "a", now=3.0)
    assert ops(outs, "admitted") and not ops(outs, "round") and r.roles[mid] is None
    r.disconnected(3, now=4.0)
    outs = []
    for m in (0, 1, 2, mid):
        outs += r.checkin(m, 5, m != mid, now=4.1, for_generation=2)
    assert plan_of(outs).replacements == {3: mid}


def test_a_death_during_the_rebuild_loses_the_half_built_stage_again():
    r, _ = started(expect=6)
    r.disconnected(2, now=5.0)
    outs = []
    for mid in (0, 1, 3, 4, 5):
        outs += r.checkin(mid, 8, mid < 4, now=5.1, for_generation=2)
    assert plan_of(outs).replacements == {2: 4}
    r.disconnected(3, now=5.3)  # a neighbour dies while member 4 rebuilds stage 2
    outs = []
    for mid in (0, 1, 4, 5):  # member 4 never finished: it holds no state for stage 2
        outs += r.checkin(mid, 8, mid < 4, now=5.5, for_generation=3)
    plan = plan_of(outs)
    assert plan.lost == [2, 3] and plan.replacements == {2: 4, 3: 5}


def test_a_member_lost_during_a_round_is_not_waited_for():
    r, _ = started(expect=6)
    r.disconnected(2, now=5.0)
    outs = r.checkin(0, 8, True, now=5.1, for_generation=2) + r.checkin(1, 8, True, now=5.1, for_generation=2)
    outs += r.disconnected(5, now=5.2)  # an idle spare dies meanwhile
    for mid in (3, 4):
        outs += r.checkin(mid, 8, mid == 3, now=5.3, for_generation=2)
    plan = plan_of(outs)
    assert plan.dead == [2, 5] and plan.replacements == {2: 4} and 5 not in plan.roles


def test_before_any_step_a_lost_stage_is_rebuilt_from_the_seed_not_recovered():
    r, _ = started()
    r.disconnected(1, now=3.0)
    outs = []
    for mid in (0, 2, 3, 4):
        outs += r.checkin(mid, 0, False, now=3.1, for_generation=2)
    plan = plan_of(outs)
    assert plan.fresh and plan.lost == [] and plan.replacements == {1: 4} and plan.roles[2] == 2


def test_expect_below_stages_is_refused():
    with pytest.raises(ValueError):
        Roster(4, 3, dead_after=1.0, startup_wait_s=1.0, join_wait_s=0.0, now=0.0)


# -- a standby coordinator's roster, rebuilt from the members' reports (membership.rebuild) ----------
from ds_checkfree.elastic.membership.rebuild import (Report, expected_members, not_reregistered,  # noqa: E402
                                                     rebuild, rejoin)
from ds_checkfree.elastic.membership.roster import CheckIn  # noqa: E402


def report(mid, plan: Plan, steps=12, **kw) -> Report:
    """What member ``mid`` knows after applying ``plan`` and completing ``steps`` steps."""
    fields = dict(id=mid, host="h", pid=100 + mid, addr="127.0.0.1", standby_port=40000 + mid,
                  generation=plan.generation, roles=dict(plan.roles), plan_steps=plan.resume_step - 1,
                  steps_done=steps)
    fields.update(kw)
    return Report(**fields)


def rebuilt(reports, expect=5, now=100.0, **kw):
    return rebuild(reports, num_stages=4, expect=expect, dead_after=10.0, startup_wait_s=30.0,
                   join_wait_s=kw.pop("join_wait_s", 0.0), now=now, **kw)


def test_reports_round_trip_through_json():
    import json
    _, plan = started()
    rep = report(3, plan, checkin=CheckIn(7, True), checked_in_for=2, round_seen=2)
    assert Report.from_message(json.loads(json.dumps(rep.as_message()))) == rep
    assert rep.mid_round and not report(3, plan).mid_round


def test_consistent_reports_rebuild_the_same_roster_and_send_nothing():
    """The common failover: every member was training in generation 1: same roles, no round,
    not one message (the data plane is untouched)."""
    _, plan = started()
    roster, outs = rebuilt([report(m, plan) for m in range(5)])
    assert outs == []
    assert roster.phase == "running" and roster.round is None and roster.generation == 1
    assert roster.roles == plan.roles and sorted(roster.members) == [0, 1, 2, 3, 4]
    assert roster.standbys() == [[m, "127.0.0.1", 40000 + m] for m in range(5)]
    assert roster.progress == {m: 12 for m in range(5)}


def test_a_stage_holder_that_never_re_registers_is_lost_and_the_spare_takes_its_stage():
    """The coordinator's host died with stage 0's process: the standby rebuilds without member 0,
    opens a round, and the spare takes stage 0 once the survivors check in."""
    _, plan = started()
    roster, outs = rebuilt([report(m, plan) for m in (1, 2, 3, 4)])
    assert ops(outs, "round")[0].to == [1, 2, 3, 4] and ops(outs, "round")[0].msg["generation"] == 2
    (lost,) = ops(outs, "member_lost")
    assert lost.msg["member"] == 0
    outs = []
    for mid in (1, 2, 3, 4):
        outs += roster.checkin(mid, 12, mid != 4, now=101.0, for_generation=2)
    new = plan_of(outs)
    assert new.generation == 2 and new.dead == [0] and new.lost == [0] and new.replacements == {0: 4}
    assert new.resume_step == 13


def test_a_lost_member_is_named_whether_or_not_the_survivors_were_already_in_a_round():
    """The host holding member 0 and the coordinator died at once. The survivors' data plane may
    already have seen member 0 die (they report a round in flight) or not: either way the standby
    names member 0 as never re-registered, and the spare takes its stage."""
    _, plan = started()
    for pending in ({}, dict(checkin=CheckIn(12, True), checked_in_for=2, round_seen=2)):
        reports = [report(m, plan, **(pending if m != 4 else {})) for m in (1, 2, 3, 4)]
        roster, outs = rebuilt(reports)
        assert not_reregistered(roster) == [0], pending
        assert ops(outs, "round")[0].msg["generation"] == 2
        new = plan_of(roster.checkin(4, 12, False, now=101.0, for_generation=2)
                      + sum((roster.checkin(m, 12, True, now=101.0, for_generation=2) for m in (1, 2, 3)
                             if not pending), []))
        assert new.replacements == {0: 4} and new.dead == [0], pending
    assert not_reregistered(rebuilt([report(m, plan) for m in range(5)])[0]) == []


def test_a_check_in_made_before_the_coordinator_was_lost_counts_in_the_rebuilt_round():
    """Stage 2 died, the old coordinator opened round 2, members 0, 1 and 3 checked in, then it
    died too: the standby reopens round 2 with those check-ins; only the spare is waited for."""
    _, plan = started()
    pending = dict(checkin=CheckIn(8, True), checked_in_for=2, round_seen=2)
    reports = [report(m, plan, **pending) for m in (0, 1, 3)] + [report(4, plan, round_seen=2)]
    roster, outs = rebuilt(reports)
    assert ops(outs, "round")[0].msg["generation"] == 2 and not ops(outs, "plan")
    assert sorted(roster.round.checkins) == [0, 1, 3]
    new = plan_of(roster.checkin(4, 0, False, now=101.0, for_generation=2))
    assert new.replacements == {2: 4} and new.lost == [2] and new.dead == [2] and new.resume_step == 9


def test_a_member_that_missed_the_newest_plan_makes_everyone_agree_again():
    r, plan1 = started()
    r.disconnected(2, now=5.0)
    outs = []
    for mid in (0, 1, 3, 4):
        outs += r.checkin(mid, 8, mid != 4, now=5.1, for_generation=2)
    plan2 = plan_of(outs)
    # plan 2 reached members 0, 1, 4; member 3 was still waiting for it when the coordinator died
    reports = [report(m, plan2, steps=8) for m in (0, 1, 4)]
    reports.append(report(3, plan1, steps=8, checkin=CheckIn(8, True), checked_in_for=2, round_seen=2))
    roster, outs = rebuilt(reports)
    assert roster.generation == 2 and roster.roles == plan2.roles
    (rnd,) = ops(outs, "round")
    assert rnd.msg["generation"] == 3 and rnd.to == [0, 1, 3, 4] and not roster.round.checkins
    outs = []
    for mid in (0, 1, 3, 4):
        outs += roster.checkin(mid, 8, True, now=101.0, for_generation=3)
    plan3 = plan_of(outs)
    assert plan3.lost == [] and plan3.roles == plan2.roles and plan3.resume_step == 9


def test_a_finished_report_ends_the_job_for_everyone():
    _, plan = started()
    roster, outs = rebuilt([report(m, plan, finished=(m == 0)) for m in range(5)])
    (done,) = ops(outs, "done")
    assert done.to == [0, 1, 2, 3, 4] and roster.phase == "done"


def test_a_member_the_newest_plan_dropped_is_evicted_again():
    r, plan1 = started()
    r.disconnected(1, now=5.0)
    outs = []
    for mid in (0, 2, 3, 4):
        outs += r.checkin(mid, 8, mid != 4, now=5.1, for_generation=2)
    plan2 = plan_of(outs)
    # member 1 had been evicted while stopped; it wakes as the coordinator dies and reports
    roster, outs = rebuilt([report(m, plan2) for m in (0, 2, 3, 4)] + [report(1, plan1)])
    (ev,) = ops(outs, "evicted")
    assert ev.to == [1] and ev.close and 1 not in roster.members and not ops(outs, "round")


def test_a_late_member_is_refused_once_the_roster_was_rebuilt_and_a_present_one_taken_back():
    _, plan = started()
    roster, _ = rebuilt([report(m, plan) for m in (1, 2, 3, 4)])
    ok, outs = rejoin(roster, report(0, plan), now=101.0)
    assert not ok and outs == []
    ok, outs = rejoin(roster, report(2, plan, standby_port=41002), now=101.0)
    assert ok and roster.members[2].standby_port == 41002


def test_lost_while_the_job_was_forming_the_start_up_goes_on():
    empty = Plan(0, {}, {}, {}, [], [], [], {}, 1, True)
    reports = [report(m, empty, steps=0, checkin=CheckIn(0, False), checked_in_for=1, round_seen=1) for m in range(4)]
    roster, outs = rebuilt(reports + [report(4, empty, steps=0, round_seen=1)])
    assert roster.phase == "gathering" and ops(outs, "round")[0].to == [0, 1, 2, 3, 4]
    plan = plan_of(roster.checkin(4, 0, False, now=100.5, for_generation=1))
    assert plan.fresh and plan.roles == {0: 0, 1: 1, 2: 2, 3: 3, 4: None}


def test_a_member_late_for_a_rebuilt_start_up_is_one_more_hello():
    empty = Plan(0, {}, {}, {}, [], [], [], {}, 1, True)
    roster, _ = rebuilt([report(m, empty, steps=0, round_seen=1) for m in (0, 1, 2, 3)])
    ok, outs = rejoin(roster, report(4, empty, steps=0), now=100.2)
    assert ok and ops(outs, "round")[0].to == [4] and 4 in roster.members


def test_the_collection_is_complete_once_every_member_of_the_newest_plan_reported():
    _, plan = started()
    assert expected_members([report(m, plan) for m in (1, 2)]) == {0, 1, 2, 3, 4}
    assert expected_members([]) == set()


def test_standbys_are_the_members_with_a_reserved_port_in_id_order():
    r = Roster(4, 5, dead_after=10.0, startup_wait_s=30.0, join_wait_s=0.0, now=0.0)
    for mid, port in ((3, 4003), (0, None), (1, 4001)):
        r.hello(mid, "h", mid, f"10.0.0.{mid}", now=1.0, standby_port=port)
    assert r.standbys() == [[1, "10.0.0.1", 4001], [3, "10.0.0.3", 4003]]
    r.disconnected(1, now=2.0)
    assert r.standbys() == [[3, "10.0.0.3", 4003]]


def test_a_loaded_hand_off_is_settled_once_every_stage_holder_is_past_it():
    """Preemption hygiene: the hand-off the plan told member 4 to load (slot 2, after step 8)
    is deleted once every stage holder completed step 9, not before (a slower member may still
    ask whether it exists)."""
    r, _ = started()
    r.disconnected(2, now=5.0)
    for mid in (0, 1, 3, 4):
        r.checkin(mid, 8, mid != 4, now=5.1, for_generation=2)
    assert r.pending_handoffs == [(2, 2, 8)]
    for mid in (0, 1, 3, 4):
        r.beat(mid, 6.0, steps_done=9 if mid != 3 else 8)
    assert r.settled_handoffs() == [] and r.pending_handoffs
    r.beat(3, 6.5, steps_done=9)
    assert r.settled_handoffs() == [(2, 8)] and r.pending_handoffs == []


def test_a_later_plan_or_the_end_settles_every_earlier_hand_off():
    r, _ = started(expect=6)
    r.disconnected(2, now=5.0)
    for mid in (0, 1, 3, 4, 5):
        r.checkin(mid, 8, mid < 4, now=5.1, for_generation=2)
    r.disconnected(1, now=6.0)  # before anyone completed a step
    for mid in (0, 3, 4, 5):
        r.checkin(mid, 8, mid != 5, now=6.1, for_generation=3)
    assert r.settled_handoffs() == [(2, 8)] and r.pending_handoffs == [(3, 1, 8)]
    r.finished(0, now=7.0)
    assert r.settled_handoffs() == [(1, 8)]
