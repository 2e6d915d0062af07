"""The coordinator is not a single point of failure (``membership.failover``, ``standby``, ``rebuild``).

Real processes: the coordinator of a ``mpirun --with-ft ulfm`` job (4 stages + 1 spare, tiny
model) is SIGKILLed mid-run: training goes on, the lowest live member starts a standby
coordinator on the port it reserved, every member re-registers there and the roster is rebuilt
from their reports, with no stage lost and no recovery; a stage killed 8 steps later is
replaced by the spare as before. Sockets, no training: the standby walk's order, and the
coordinator's per-member send queues (a member that stops reading stalls no one else).
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import threading
import time

import pytest

from conftest import events_of, read_metrics, steps_accounted, steps_of, write_config
from ds_checkfree.elastic.membership import failover
from test_elastic import ElasticJob, _check_survived, exit_pids
from test_multihost import elastic_launcher, env, placement, two_hosts  # noqa: F401  (a fixture)

STEPS = 40


def coordinator_pid(out) -> int:
    """The first coordinator's pid, from the announce file the rank that started it waited for."""
    (announce,) = list(out.glob("coordinator-*.json"))
    return json.loads(announce.read_text())["pid"]


def standby_logs(out) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(out.glob("failover-coordinator-*.log")))


def kill_the_coordinator(tmp_path, seed: int, **checkfree):
    cfg = write_config(tmp_path / "ds.json", mode="checkfree", spares=1, **checkfree)
    job = ElasticJob(tmp_path, 5, cfg, STEPS)
    kill_step = random.Random(seed).randint(5, 12)
    job.wait_for_step(kill_step)
    before = job.rank_pids()
    assert sorted(before) == [0, 1, 2, 3, 4], before
    os.kill(coordinator_pid(job.out), signal.SIGKILL)
    killed_at = time.time()
    return job, before, killed_at


def wait_for_rebuild(job, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while "roster rebuilt" not in standby_logs(job.out):
        if time.time() > deadline or job.proc.poll() is not None:
            pytest.fail(f"no standby coordinator rebuilt the roster:\n{job.log()[-6000:]}")
        time.sleep(0.1)


def _check_failover(job, before: dict[int, int]) -> None:
    """Every member re-registered with member 0's standby, which rebuilt the roster from all
    five reports without a round: the data plane was not touched."""
    log, standby = job.log(), standby_logs(job.out)
    rejoined = re.findall(r"\[member (\d+)\] re-registered with the coordinator", log)
    assert sorted(map(int, rejoined)) == sorted(before), log[-6000:]
    assert "[member 0] started the standby coordinator" in log
    assert "roster rebuilt from 5 member reports: generation 1" in standby, standby[-3000:]
    assert "no round needed (the data plane is untouched)" in standby, standby[-3000:]


def test_the_coordinator_sigkilled_alone_the_job_finishes_every_step(tmp_path):
    job, before, killed_at = kill_the_coordinator(tmp_path, seed=1)
    done = max(r["step"] for r in steps_of(read_metrics(job.out)))
    assert done < STEPS, f"the kill came too late (step {done} of {STEPS}): the test proves nothing"
    rc = job.wait()
    log = job.log()
    assert rc == 0, log[-6000:]
    assert exit_pids(log) == before  # no process restarted, none lost
    records = read_metrics(job.out)
    assert steps_accounted(records) == list(range(1, STEPS + 1))
    assert not events_of(records, "failure") and not events_of(records, "recovery")  # no stage was lost
    _check_failover(job, before)
    assert "the coordinator at 127.0.0.1:" in log and "was lost: training goes on" in log
    assert "Traceback" not in log


@pytest.mark.slow  # failover alone: the test above; a stage lost with the coordinator and a spare taking over: the two-host test below; kept out of the default suite for time
def test_a_stage_killed_after_the_coordinator_is_replaced_by_the_spare(tmp_path):
    job, before, _ = kill_the_coordinator(tmp_path, seed=2)
    stage_step = max(r["step"] for r in steps_of(read_metrics(job.out))) + 8
    wait_for_rebuild(job)  # the stage dies once membership is back (a death during the failover: test_roster)
    job.wait_for_step(stage_step)
    killed = job.kill(2)
    killed_at = time.time()
    done = max(r["step"] for r in steps_of(read_metrics(job.out)))
    assert done < STEPS, f"the kill came too late (step {done} of {STEPS}): the test proves nothing"
    rc = job.wait()
    records = _check_survived(job, rc, before, killed, killed_at, victim_stage=2, steps=STEPS,
                              method="weighted_average")
    (recovery,) = events_of(records, "recovery")
    assert recovery["sources"] == [1, 3]
    _check_failover(job, before)
    assert "spare: taking the place of stage 2" in job.log()
    assert "generation 2: roles" in standby_logs(job.out)  # the standby made the recovery's plan


def test_host_a_lost_with_the_coordinator_and_stage_0_a_spare_on_host_b_takes_over(two_hosts, tmp_path):
    """Two hosts (network namespaces): hostA runs rank 0 (stage 0) and the coordinator it
    started, hostB stages 1-3 and two spares. Every process of the job on hostA but mpirun is
    SIGKILLed at once (Open MPI does not survive the loss of its launching node: README). The
    members on hostB find member 0's standby address dead, member 1 starts the standby, the
    roster is rebuilt without member 0 and a spare takes stage 0 (CheckFree+: a copy of stage 1)."""
    bed = two_hosts(slots={"hostA": 1, "hostB": 5})
    cfg = write_config(tmp_path / "ds.json", mode="checkfree_plus", spares=2)
    job = ElasticJob(tmp_path, 6, cfg, STEPS, launcher=elastic_launcher(bed, 6), env=env())
    job.wait_for_step(random.Random(3).randint(6, 12), timeout=150)
    before = job.rank_pids()
    assert placement(job, bed) == {0: "hostA", 1: "hostB", 2: "hostB", 3: "hostB", 4: "hostB", 5: "hostB"}
    coordinator = coordinator_pid(job.out)
    assert bed.hostname_of(coordinator) == "hostA"
    for pid in (before[0], coordinator):
        os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    done = max(r["step"] for r in steps_of(read_metrics(job.out)))
    assert done < STEPS, f"the kill came too late (step {done} of {STEPS}): the test proves nothing"
    rc = job.wait()
    # every group formed anew: the copies' ready marks were in the lost coordinator's store
    records = _check_survived(job, rc, before, before[0], killed_at, victim_stage=0, steps=STEPS, method="copy",
                              groups_kept=False)
    (recovery,) = events_of(records, "recovery")
    assert recovery["sources"] == [1]
    log, standby = job.log(), standby_logs(job.out)
    assert "[member 1] started the standby coordinator" in log and "[member 0] started" not in log
    # member 0's standby address: its process is gone (refused, or reset if it was still dying)
    assert re.search(r"standby coordinator of member 0 at \S+ (unreachable|did not answer).*trying the next", log)
    assert "roster rebuilt from 5 member reports" in standby, standby[-3000:]
    # whether the survivors' data plane had already opened a round (they saw member 0 die) or not,
    # the standby names member 0 as never re-registered and plans the spare into its stage
    assert "member(s) [0] did not re-register" in standby and "replacements {0: 4}" in standby, standby[-3000:]


# -- the standby walk and the send queues, over real sockets -------------------------------------------
def _answering(reply: dict | None):
    """A listener that answers one hello with ``reply`` (None: accepts and never answers)."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = server.accept()
        conn.makefile("r").readline()
        if reply is not None:
            conn.sendall((json.dumps(reply) + "\n").encode())
        time.sleep(5)
        conn.close()
    threading.Thread(target=serve, daemon=True).start()
    return server


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_walk_skips_dead_and_silent_standbys_and_stops_at_the_first_live_one():
    silent = _answering(None)
    live = _answering({"op": "welcome", "id": 3, "store_port": 1})
    later = _answering({"op": "welcome", "id": 3, "store_port": 2})
    standbys = [[0, "127.0.0.1", _closed_port()], [1, "127.0.0.1", silent.getsockname()[1]],
                [2, "127.0.0.1", live.getsockname()[1]], [3, "127.0.0.1", later.getsockname()[1]]]
    started, said = [], []
    sock, _, welcome, address = failover.walk(standbys, 3, lambda: started.append(1) or True,
                                              lambda: {"op": "rejoin", "id": 3}, 1.0, said.append)
    sock.close()
    assert welcome["store_port"] == 1 and address == ("127.0.0.1", live.getsockname()[1])
    assert started == []  # member 3 comes after a live standby: it starts none
    assert len(said) == 2 and "unreachable" in said[0] and "did not answer" in said[1]


def test_the_walk_starts_this_members_standby_when_every_earlier_one_is_dead():
    own = _answering({"op": "welcome", "id": 1, "store_port": 5})
    standbys = [[0, "127.0.0.1", _closed_port()], [1, "127.0.0.1", own.getsockname()[1]]]
    started = []
    sock, _, welcome, _ = failover.walk(standbys, 1, lambda: started.append(1) or True, lambda: {"op": "rejoin"},
                                        1.0, lambda m: None)
    sock.close()
    assert started == [1] and welcome["store_port"] == 5


def test_the_lost_coordinators_own_address_is_asked_first_and_briefly():
    """Only this member's connection broke: the coordinator is still there and answers, so no
    standby starts; a dead one is passed over at once."""
    alive = _answering({"op": "welcome", "id": 2, "store_port": 7})
    started = []
    found = failover.walk([[0, "127.0.0.1", _closed_port()]], 0, lambda: started.append(1) or True,
                          lambda: {"op": "rejoin"}, 1.0, lambda m: None, lost=("127.0.0.1", alive.getsockname()[1]))
    found[0].close()
    assert found[2]["store_port"] == 7 and started == []
    said = []
    assert failover.walk([], 0, lambda: True, lambda: {}, 1.0, said.append, lost=("127.0.0.1", _closed_port())) is None
    assert said and said[0].startswith("the lost coordinator at")


def test_a_standby_that_refuses_the_member_ends_the_walk():
    refusing = _answering({"op": "refused", "why": "declared lost"})
    with pytest.raises(failover.Refused, match="declared lost"):
        failover.walk([[0, "127.0.0.1", refusing.getsockname()[1]]], 2, lambda: True, lambda: {}, 1.0,
                      lambda m: None)
    assert failover.walk([[0, "127.0.0.1", _closed_port()]], 2, lambda: True, lambda: {}, 1.0, lambda m: None) is None


def _member(port: int, mid: int) -> tuple[socket.socket, object]:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall((json.dumps({"op": "hello", "id_hint": mid, "host": "h", "pid": mid, "addr": "127.0.0.1",
                              "num_stages": 4, "dp": 1, "standby_port": 40000 + mid}) + "\n").encode())
    return sock, sock.makefile("r")


def test_a_member_that_stops_reading_stalls_no_other_members_messages():
    """The coordinator only queues under its lock: 64 MB for a member that never reads (its socket
    buffers fill) must not keep the next message from reaching another member."""
    from ds_checkfree.elastic.membership.coordinator import Coordinator, JobShape
    from ds_checkfree.elastic.membership.roster import Out
    coord = Coordinator(JobShape(4, 5), host="127.0.0.1", log=lambda m: None)
    threading.Thread(target=coord.run, daemon=True).start()
    stuck, _ = _member(coord.port, 0)
    other, reader = _member(coord.port, 1)
    assert json.loads(reader.readline())["op"] == "welcome"
    flood = threading.Thread(target=coord._apply, daemon=True,
                             args=(lambda: [Out([0], {"op": "pad", "x": "y" * (64 << 20)})],))
    flood.start()
    flood.join(timeout=30)
    # with a blocking send under the lock this call would wait on the stuck member forever
    threading.Thread(target=coord._apply, daemon=True, args=(lambda: [Out([1], {"op": "after_the_flood"})],)).start()
    other.settimeout(30)
    seen = []
    while not seen or seen[-1] != "after_the_flood":
        seen.append(json.loads(reader.readline())["op"])
    assert "after_the_flood" in seen
    stuck.close()
    other.close()


def test_a_hand_off_is_deleted_from_the_store_once_every_stage_holder_is_past_it():
    """Preemption hygiene on the coordinator's real store: the blob stays while a member may
    still ask for it and goes once every stage holder completed the step after it."""
    from datetime import timedelta

    import torch.distributed as tdist

    from ds_checkfree.elastic.membership.coordinator import Coordinator, JobShape
    from ds_checkfree.elastic.preemption import available, publish
    coord = Coordinator(JobShape(4, 5, join_wait_s=0.0), host="127.0.0.1", log=lambda m: None)
    roster = coord.roster
    for mid in range(5):
        roster.hello(mid, "h", mid, "127.0.0.1", now=1.0)
    for mid in range(5):
        roster.checkin(mid, 0, False, now=2.0, for_generation=1)
    client = tdist.TCPStore("127.0.0.1", coord.store_port, is_master=False, wait_for_workers=False,
                            timeout=timedelta(seconds=10))
    publish(client, 1, 7, {"w": [1.0]})  # member 1 preempted after step 7, then its connection closes
    roster.disconnected(1, now=3.0)
    for mid in (0, 2, 3, 4):
        roster.checkin(mid, 7, mid != 4, now=3.1, for_generation=2)
    assert roster.generation == 2 and roster.roles[4] == 1
    for steps in (7, 8):
        for mid in (0, 2, 3, 4):
            roster.beat(mid, 4.0, steps_done=steps)
        coord._delete_settled_handoffs(roster.settled_handoffs())
        assert available(client, 1, 7) == (steps == 7)


def test_without_failover_a_lost_coordinator_leaves_the_data_plane_alone_and_the_start_up_says_so(capsys):
    """A coordinator started with ``--no_failover`` hands out no standby list: the member says at
    start-up what the job would not survive; when the coordinator goes, the member is not woken
    (training goes on) and the loss is reported only to the next agreement."""
    from types import SimpleNamespace

    from ds_checkfree.elastic.membership.client import MemberClient
    from ds_checkfree.elastic.membership.coordinator import Coordinator, JobShape
    from ds_checkfree.elastic.world import ElasticWorld
    coord = Coordinator(JobShape(4, 5), host="127.0.0.1", log=lambda m: None, failover=False)
    threading.Thread(target=coord.run, daemon=True).start()
    rounds = []
    client = MemberClient(("127.0.0.1", coord.port), id_hint=0, num_stages=4, addr="127.0.0.1",
                          on_round=rounds.append, standby_port=45000)
    assert client.standbys is None and client.membership_settled()
    ElasticWorld._say_failover(SimpleNamespace(client=client, address=client.address, rank=0, _standby=None), "")
    said = capsys.readouterr().err
    assert "coordinator failover is off" in said and "would not survive the coordinator's loss" in said
    assert client.next_message(timeout=10)["op"] == "round"  # the start-up round, before the loss
    rounds.clear()
    with coord.lock:
        coord.conns[0][1].close()  # the coordinator's end goes away
    assert client.next_message(timeout=10) == {"op": "coordinator_lost"}
    assert client.gave_up and rounds == []  # nothing woke the data plane
    assert not client.send({"op": "beat"})  # dropped, not raised: the heartbeat thread goes on


def test_a_failure_inside_the_failover_reaches_the_main_thread_instead_of_ending_the_reader_silently():
    """The membership thread must never die without a word: an error while failing over (here the
    report) is handed to the main thread as a lost coordinator, which the next agreement names
    (a spare waiting for a plan would otherwise wait forever)."""
    from ds_checkfree.elastic.membership.client import MemberClient
    from ds_checkfree.elastic.membership.coordinator import Coordinator, JobShape

    class BrokenHooks:
        def report(self):
            raise RuntimeError("no report")

        def start_standby(self, position):
            return False

        def connect_socket(self, addr, port, timeout_s):
            return socket.create_connection((addr, port), timeout=timeout_s)

    coord = Coordinator(JobShape(4, 5), host="127.0.0.1", log=lambda m: None)
    threading.Thread(target=coord.run, daemon=True).start()
    client = MemberClient(("127.0.0.1", coord.port), id_hint=0, num_stages=4, addr="127.0.0.1", hooks=BrokenHooks())
    assert client.next_message(timeout=10)["op"] == "round"
    with coord.lock:
        coord.conns[0][1].close()
    assert client.next_message(timeout=20) == {"op": "coordinator_lost"}
    assert client.gave_up and not client.membership_settled()
