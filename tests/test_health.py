import pytest

from ds_checkfree.health import HeartbeatTracker, PeerState, agree_failed_set, liveness

A, S, D = PeerState.ALIVE, PeerState.SUSPECTED, PeerState.DEAD


def test_liveness_thresholds():
    seen = {0: 100.0, 1: 98.0, 2: 97.0, 3: 95.0, 4: 90.0, 5: 101.0}
    assert liveness(seen, 100.0, suspect_after=3.0, dead_after=5.0) == {
        0: A, 1: A, 2: S, 3: D, 4: D, 5: A}


@pytest.mark.parametrize("sus,dead", [(0, 1), (2, 2), (3, 1), (-1, 2), (float("nan"), 2)])
def test_liveness_validates(sus, dead):
    with pytest.raises(ValueError):
        liveness({0: 0.0}, 1.0, sus, dead)
    with pytest.raises(ValueError):
        HeartbeatTracker([0], sus, dead, 0.0)


def test_peer_state_is_str():
    assert PeerState.DEAD == "dead"


def test_alive_suspected_dead_transitions():
    t = HeartbeatTracker([0, 1, 2], suspect_after=2.0, dead_after=5.0, start_time=0.0)
    assert t.states(1.0) == {0: A, 1: A, 2: A}
    t.beat(0, 2.5)
    assert t.states(3.0) == {0: A, 1: S, 2: S}
    t.beat(1, 3.0)  # a beat resets a suspected peer
    assert t.states(4.0) == {0: A, 1: A, 2: S}
    assert t.alive(4.0) == {0, 1, 2}  # suspected peers are still members
    assert t.suspected(4.0) == {2}
    assert t.states(5.0)[2] is D
    assert t.alive(5.0) == {0, 1}


def test_dead_is_sticky_and_rejoin():
    t = HeartbeatTracker([0, 1], 1.0, 2.0, start_time=0.0)
    t.beat(0, 1.9)
    assert t.states(2.5) == {0: A, 1: D}
    assert t.beat(1, 2.6) is False  # late heartbeat from a dead peer: ignored
    assert t.states(2.7)[1] is D
    assert t.newly_dead(2.7) == {1}
    t.rejoin(1, 3.5)
    assert t.states(4.0) == {0: D, 1: A}  # 0 timed out meanwhile
    assert t.beat(1, 4.1) is True


def test_newly_dead_reported_once():
    t = HeartbeatTracker([0, 1, 2], 1.0, 2.0, start_time=0.0)
    assert t.newly_dead(1.5) == set()
    t.beat(0, 1.5)
    t.beat(1, 1.5)
    assert t.newly_dead(2.0) == {2}
    assert t.newly_dead(2.1) == set()
    assert t.newly_dead(10.0) == {0, 1}
    assert t.newly_dead(11.0) == set()
    t.rejoin(2, 11.0)
    assert t.newly_dead(13.0) == {2}  # a rejoined peer can be reported again


def test_mark_dead():
    t = HeartbeatTracker([0, 1], 1.0, 2.0, start_time=0.0)
    t.mark_dead(1)
    assert t.states(0.1) == {0: A, 1: D}
    assert t.beat(1, 0.2) is False
    assert t.newly_dead(0.3) == {1}
    assert t.newly_dead(0.4) == set()
    assert t.alive(0.5) == {0}


def test_out_of_order_beats_do_not_move_back():
    t = HeartbeatTracker([0], 1.0, 2.0, start_time=0.0)
    t.beat(0, 5.0)
    t.beat(0, 1.0)
    assert t.states(6.5) == {0: S}


def test_unknown_peer():
    t = HeartbeatTracker([0], 1.0, 2.0, start_time=0.0)
    for call in (lambda: t.beat(7, 0.0), lambda: t.mark_dead(7), lambda: t.rejoin(7, 0.0)):
        with pytest.raises(ValueError, match="7"):
            call()


def test_agree_failed_set_is_union():
    assert agree_failed_set([{1}, {1, 3}, set()]) == {1, 3}
    assert agree_failed_set([]) == set()
    reports = [{2}, {0, 2}, {5}]
    assert agree_failed_set(reports) == agree_failed_set(reversed(reports)) == {0, 2, 5}
