import pytest

from ds_checkfree.elastic.heartbeat import HeartbeatTracker, PeerState, liveness

A, D = PeerState.ALIVE, PeerState.DEAD


def test_liveness_threshold():
    seen = {0: 100.0, 1: 96.0, 2: 95.0, 3: 90.0, 4: 101.0}
    assert liveness(seen, 100.0, dead_after=5.0) == {0: A, 1: A, 2: D, 3: D, 4: A}


@pytest.mark.parametrize("dead", [0, -1, float("nan"), float("inf")])
def test_liveness_validates(dead):
    with pytest.raises(ValueError):
        liveness({0: 0.0}, 1.0, dead)
    with pytest.raises(ValueError):
        HeartbeatTracker([0], dead, 0.0)


def test_peer_state_is_str():
    assert PeerState.DEAD == "dead"


def test_alive_dead_transitions():
    t = HeartbeatTracker([0, 1, 2], dead_after=5.0, start_time=0.0)
    assert t.states(1.0) == {0: A, 1: A, 2: A}
    t.beat(0, 2.5)
    t.beat(1, 3.0)
    assert t.states(4.9) == {0: A, 1: A, 2: A}
    assert t.states(5.0)[2] is D
    assert t.alive(5.0) == {0, 1}
    assert t.is_dead(2, 5.1) and not t.is_dead(0, 5.1)


def test_dead_is_sticky_and_rejoin():
    t = HeartbeatTracker([0, 1], 2.0, start_time=0.0)
    t.beat(0, 1.9)
    assert t.states(2.5) == {0: A, 1: D}
    assert t.beat(1, 2.6) is False  # late heartbeat from a dead peer: ignored
    assert t.states(2.7)[1] is D
    assert t.newly_dead(2.7) == {1}
    t.rejoin(1, 3.5)
    assert t.states(4.0) == {0: D, 1: A}  # 0 timed out meanwhile
    assert t.beat(1, 4.1) is True


def test_newly_dead_reported_once():
    t = HeartbeatTracker([0, 1, 2], 2.0, start_time=0.0)
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
    t = HeartbeatTracker([0, 1], 2.0, start_time=0.0)
    t.mark_dead(1)
    assert t.states(0.1) == {0: A, 1: D}
    assert t.beat(1, 0.2) is False
    assert t.newly_dead(0.3) == {1}
    assert t.newly_dead(0.4) == set()
    assert t.alive(0.5) == {0}


def test_out_of_order_beats_do_not_move_back():
    t = HeartbeatTracker([0], 2.0, start_time=0.0)
    t.beat(0, 5.0)
    t.beat(0, 1.0)
    assert t.states(6.5) == {0: A}
    assert t.states(7.0) == {0: D}


def test_unknown_peer():
    t = HeartbeatTracker([0], 2.0, start_time=0.0)
    for call in (lambda: t.beat(7, 0.0), lambda: t.mark_dead(7), lambda: t.rejoin(7, 0.0)):
        with pytest.raises(ValueError, match="7"):
            call()



def test_monitor_reports_transport_failure_with_its_reason_once():
    from ds_checkfree.elastic.heartbeat import HeartbeatThread
    now = [0.0]
    m = HeartbeatThread(0, [1, 2], interval_s=0.5, timeout_s=3.0, clock=lambda: now[0])
    m._mark(2, "send failed: peer gone")
    m._record_verdicts(now[0])
    (ev,) = m.events()
    assert ev["peer"] == 2 and ev["reason"] == "send failed: peer gone"
    now[0] = 3.5  # peer 1 silent past the timeout
    m._record_verdicts(now[0])
    (ev,) = m.events()
    assert ev["peer"] == 1 and "no heartbeat" in ev["reason"]
    m._record_verdicts(10.0)
    assert m.events() == [] and m.summary()["peers_declared_dead"] == [1, 2]
