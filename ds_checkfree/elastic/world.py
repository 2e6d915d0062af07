"""Surviving real process deaths: membership through the job's coordinator, a rebuilt data plane.

Launched as ``mpirun --with-ft ulfm -n S+N python launch/train.py ... --spares N`` (ranks
0..S-1 take the stages, the N others wait as spares), and joined later from anywhere by
``python launch/train.py ... --join HOST:PORT``. Membership lives outside ``COMM_WORLD``: every
process is a member of the coordinator (``ds_checkfree.elastic.membership``), named by a member id;
MPI only starts the processes (``--with-ft ulfm`` keeps ``mpirun`` from killing the job when
one dies) and, when no ``--coordinator`` is given, lets rank 0 start one and tell the others
where it is.

The training data plane is a torch.distributed group of the S stage holders (data-plane
rank = stage; gloo on CPU, NCCL on CUDA: ``data_plane``), formed per generation under the
coordinator's store. When a stage's process dies or stalls, the coordinator opens a round:
each member tears its group down (a member blocked on the stalled peer is woken at once),
checks in, and receives one plan: who holds which stage, which stages lost their state, the
step to resume from. The caller rebuilds the DeepSpeed engine around the kept state and
lets the CheckFree rules re-materialise the lost stages.

Losing the coordinator is survived without touching the data plane: each member walks the
standby list the coordinator handed out (``membership.failover``), the first live member starts
a standby coordinator on the port it reserved at start-up (``membership.standby``), and every
member re-registers there with its report (``report``: id, generation, roles, slot, steps),
from which the standby rebuilds the roster (``membership.rebuild``).
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

from ds_checkfree.elastic.membership import standby
from ds_checkfree.elastic.membership.client import CoordinatorLost, MemberClient, say
from ds_checkfree.elastic.membership.discovery import locate
from ds_checkfree.elastic.membership.rebuild import Report
from ds_checkfree.elastic.membership.roster import CheckIn, Plan
from ds_checkfree.elastic.member_plane import MemberPlane
from ds_checkfree.elastic.standby_groups import StandbyGroups
from ds_checkfree.elastic.store_clients import NextStoreClient


#: the coordinator store's key under which a failed member leaves its reason
JOB_FAILED_KEY = "checkfree/job_failed"


class JobFailed(RuntimeError):
    """Another member failed for a reason that is no lost peer: the job stops."""


class NoSpareLeft(RuntimeError):
    """A stage was lost and no spare or joining process took its place."""

    def __init__(self, message: str, lost_stages: list[int], dead_ranks: list[int], survivors: list[int]):
        super().__init__(message)
        self.lost_stages, self.dead_ranks, self.survivors = lost_stages, dead_ranks, survivors


@dataclass
class Agreement:
    """What every member agreed on for one generation (identical on all members)."""
    dead_ranks: list[int]       # member ids gone since the previous generation
    lost_stages: list[int]
    replacements: dict[int, int]  # stage -> member id that takes it
    resume_step: int
    revoked_at: float            # when this member learnt of the failure
    agreed_at: float
    roles_before: dict = field(default_factory=dict)  # member id -> stage (None: spare) before
    generation: int = 0
    evicted: list[int] = field(default_factory=list)
    fresh: bool = False
    dp: int = 1  # replicas per stage: ``lost_stages`` and ``replacements`` name slots (stage * dp + replica)

    def lost_pairs(self) -> list[tuple[int, int]]:
        """The lost slots as (stage, replica) pairs, what the recovery planner takes."""
        return [divmod(slot, self.dp) for slot in self.lost_stages]


class ElasticWorld(MemberPlane):
    """Roles (stage or spare) of every member, agreement after failures; the data plane's side
    (forming, waking, leaving a generation's groups) is ``MemberPlane``'s."""

    def __init__(self, num_stages: int, spares: int, dp_timeout_s: float = 60.0, *, coordinator: str | None = None,
                 joining: bool = False, cf=None, log_dir: str | None = None, dp: int = 1):
        """``dp`` data-parallel replicas per stage: a role is a slot, ``stage * dp + replica``
        (DeepSpeed's rank order), and the data plane has ``num_stages * dp`` ranks."""
        self.num_stages, self.dp_timeout_s, self.dp = num_stages, dp_timeout_s, dp
        self.expect, self.cf, self.log_dir = num_stages * dp + spares, cf, log_dir
        self.roles: dict[int, int | None] = {}
        self.generation = 0
        self._lock = threading.Lock()
        self.plane = self._plane()  # refuses an accelerator without a safe teardown, before joining
        self._plane_formed = False  # a data plane formed or forming that a round must wake
        self._round_announced = 0  # the highest generation a round was announced for
        self._checked_in_for = 0   # the generation this member last checked in for
        self._pending_checkin: CheckIn | None = None  # sent, its plan not received yet
        self._plan_steps = 0       # steps completed when the current plan was made
        self._finished = False     # training completed here (told to the coordinator)
        self.progress = lambda: 0  # this member's last completed step (the trainer's, ``set_progress``)
        mpi_rank = os.environ.get("OMPI_COMM_WORLD_RANK")
        id_hint = None if joining or mpi_rank is None else int(mpi_rank)
        address, addr = locate(num_stages, spares, dp, cf, log_dir, coordinator, joining)
        self.addr = addr
        self._shared_store, self._shared_store_at = None, None
        self._next_store = NextStoreClient(self._open_store_client, self._keep_for_next_generation)
        self._standby_groups = StandbyGroups(self._open_store_client, self._keep_standby_copies, dp_timeout_s)
        # the port this member offers for a standby coordinator, held for the process's life
        self._standby, why_no_standby = standby.reserve(addr) if cf is not None else (None, "no configuration")
        self.client = MemberClient(address, id_hint=id_hint, num_stages=num_stages, addr=addr, dp=dp,
                                   connect_timeout_s=max(60.0, dp_timeout_s), on_round=self._on_round,
                                   standby_port=self._standby_port(), hooks=self)
        self.rank = self.client.id
        self.client.progress = lambda: self.progress()
        print(f"[member {self.rank}] {socket.gethostname()} pid {os.getpid()}: member of the job at "
              f"{address[0]}:{address[1]} (advertising {addr})", flush=True)
        self._say_failover(why_no_standby)

    @property
    def address(self) -> tuple[str, int]:
        """The coordinator this member is registered with (a standby's after a failover)."""
        return self.client.address

    def set_progress(self, steps_done) -> None:
        """``steps_done()``: this member's last completed step (beaten to the coordinator, and
        reported to a standby after a failover)."""
        self.progress = steps_done

    # -- roles ---------------------------------------------------------------------------
    @property
    def slot(self) -> int | None:
        """This member's data-plane rank (``stage * dp + replica``), None for a spare."""
        return self.roles.get(self.rank)

    @property
    def stage(self) -> int | None:
        slot = self.slot
        return None if slot is None else slot // self.dp

    def stage_ranks(self) -> list[int]:
        return sorted(r for r, s in self.roles.items() if s is not None)

    def spares(self) -> list[int]:
        return sorted(r for r, s in self.roles.items() if s is None)

    def declare_failed(self, reason: str) -> None:
        """This member failed for a reason that is no lost peer (an out-of-memory, a bug): say so
        in the coordinator's store before leaving, then end the job (spares released), so the
        survivors stop with the reason instead of taking the exit for a death and re-agreeing."""
        self.await_coordinator()
        try:
            self.shared_store().set(JOB_FAILED_KEY, f"member {self.rank} (stage {self.stage}): {reason}")
        except (RuntimeError, OSError) as err:  # the coordinator (and its store) is being replaced
            print(f"[member {self.rank}] could not publish the failure ({err}); ending the job without it",
                  file=sys.stderr, flush=True)
        self.release_spares()

    def failed_elsewhere(self) -> str | None:
        """The reason another member declared the job failed (``declare_failed``), or None."""
        self.await_coordinator()  # during a failover: ask the standby's store, not the lost one's
        try:
            store = self.shared_store()
            return store.get(JOB_FAILED_KEY).decode() if store.check([JOB_FAILED_KEY]) else None
        except (RuntimeError, OSError):  # the coordinator's store is lost with it (a failover): no verdict there
            return None

    def await_coordinator(self) -> bool:
        """Wait while the coordinator is being replaced (a failover in progress; bounded by the
        walk's own limits): whether one is registered now."""
        deadline = time.monotonic() + (self.client.silence_s or 10.0) + 90.0
        while not self.client.wait_connected(0.1):
            if self.client.gave_up or time.monotonic() > deadline:
                return False
        return True

    def wait_for_round(self, timeout_s: float) -> bool:
        """Whether a membership round is (or within ``timeout_s`` gets) announced for a newer
        generation: the coordinator's confirmation that a data-plane error was a lost member."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if self._round_announced > self.generation:
                    return True
            if self.client.gave_up:  # no coordinator will ever confirm: the recovery stops, named
                return True
            if not self.client.membership_settled():  # the coordinator is being replaced: its
                deadline = max(deadline, time.monotonic() + 1.0)  # verdict comes after the rebuild
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    # -- agreement -----------------------------------------------------------------------
    def join_job(self) -> Agreement | None:
        """A new member's first plan: the start-up plan, or the one that gives this joiner a
        lost stage; None when it was admitted as a spare (then ``wait_as_spare``)."""
        return self._wait(steps_done=0, has_state=False, as_spare=False, checkin=False)

    def agree(self, steps_done: int, has_state: bool = True) -> Agreement:
        """Check in and wait for the next generation's plan (the same on every member).

        Raises ``NoSpareLeft`` on every member alike when a lost stage found no replacement."""
        return self._wait(steps_done, has_state, as_spare=False, checkin=True)

    def wait_as_spare(self):
        """Block until this spare is given a stage (returns the Agreement) or training ends (None)."""
        return self._wait(0, False, as_spare=True, checkin=False)

    def _wait(self, steps_done: int, has_state: bool, as_spare: bool, checkin: bool):
        revoked_at = time.time()
        if checkin:
            self._checkin(steps_done, has_state)
        while True:
            msg = self.client.next_message()
            op = msg.get("op")
            if op == "round":
                if not checkin:  # a waiting spare or joiner: the failure is news now
                    revoked_at = time.time()
                if msg["generation"] > max(self.generation, self._checked_in_for):
                    self._checkin(steps_done if not as_spare else 0, has_state and not as_spare)
            elif op == "plan":
                plan = Plan.from_message(msg)
                if plan.generation <= self.generation:
                    continue
                agreement = self._apply(plan, revoked_at)
                if as_spare and self.stage is None:
                    continue
                return agreement
            elif op == "admitted":
                if not as_spare:
                    return None
            elif op == "stop":
                raise NoSpareLeft(f"the job stops: {msg['why']}", msg.get("lost", []), msg.get("dead", []),
                                  msg.get("survivors", []))
            elif op == "done":
                self.kill_evicted(msg.get("evicted", []))
                return None
            elif op == "coordinator_lost":
                raise CoordinatorLost(f"the connection to the coordinator at {self.address[0]}:{self.address[1]} "
                                      "closed: membership can no longer be agreed")

    def _checkin(self, steps_done: int, has_state: bool) -> None:
        with self._lock:
            self._checked_in_for = self.generation + 1
            self._pending_checkin = CheckIn(steps_done, has_state)
        self._send_checkin()

    def _send_checkin(self) -> None:
        """(Again after a failover: the report may have been made before the check-in.)"""
        with self._lock:
            pending, for_generation = self._pending_checkin, self._checked_in_for
        if pending is not None:  # dropped while the coordinator is lost: the report carries it
            self.client.send({"op": "checkin", "steps_done": pending.steps_done, "has_state": pending.has_state,
                              "for_generation": for_generation})

    def _apply(self, plan: Plan, revoked_at: float) -> Agreement:
        roles_before = dict(self.roles)
        with self._lock:
            self.roles, self.generation = dict(plan.roles), plan.generation
            self._plan_steps = plan.resume_step - 1
            if plan.generation >= self._checked_in_for:
                self._pending_checkin = None
        return Agreement(plan.dead, plan.lost, plan.replacements, plan.resume_step, revoked_at, time.time(),
                         roles_before=roles_before, generation=plan.generation, evicted=plan.evicted,
                         fresh=plan.fresh, dp=self.dp)

    # -- the end -------------------------------------------------------------------------
    def release_spares(self) -> None:
        """End of training (called by the lowest stage holder): the coordinator tells every
        member, spares leave; processes evicted while stopped are killed on this host. While the
        coordinator is being replaced, the report to the standby carries it (waited for)."""
        self._finished = True
        if not self.client.send({"op": "finished"}):
            if not self.client.wait_connected((self.client.silence_s or 10.0) + 60.0):
                return
            self.client.send({"op": "finished"})
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            msg = self.client.next_message(timeout=max(0.0, deadline - time.monotonic()))
            if msg is None:
                return
            if msg.get("op") == "done":
                self.kill_evicted(msg.get("evicted", []))
                return

    def kill_evicted(self, evicted: list[dict]) -> None:
        """A process evicted while stopped that never woke keeps ``mpirun`` from exiting: kill it
        when it runs on this host (elsewhere, a member on its host does; if none, it stays)."""
        here = socket.gethostname()
        for proc in evicted:
            if proc.get("host") == here and proc.get("pid") and proc["pid"] != os.getpid():
                try:
                    os.kill(proc["pid"], signal.SIGKILL)
                    print(f"[member {self.rank}] killed evicted member {proc['id']} (pid {proc['pid']})",
                          file=sys.stderr, flush=True)
                except (ProcessLookupError, PermissionError):
                    pass

    def close(self) -> None:
        self._standby_groups.close()
        self._next_store.close()
        self.client.close()

    # -- coordinator failover (the client's hooks, on its reader thread) -------------------
    def _standby_port(self) -> int | None:
        return None if self._standby is None else self._standby.getsockname()[1]

    def _say_failover(self, why_no_standby: str) -> None:
        """What a lost coordinator would do to this job, said once at start-up."""
        where = f"{self.address[0]}:{self.address[1]}"
        if self.client.standbys is None:
            print(f"[member {self.rank}] WARNING: coordinator failover is off: the coordinator at {where} hands out "
                  "no standby list (started with --no_failover). If it is lost, training goes on until the next "
                  "membership change (a lost or joining process), which then stops the job (exit 3): the job "
                  "would not survive the coordinator's loss, nor the loss of its host", file=sys.stderr, flush=True)
        elif self._standby is None:
            print(f"[member {self.rank}] coordinator failover: on, but this member cannot host a standby "
                  f"coordinator ({why_no_standby}); the other members can", file=sys.stderr, flush=True)
        else:
            print(f"[member {self.rank}] coordinator failover: on; standby coordinator reserved at "
                  f"{self.addr}:{self._standby_port()} (the lowest-id live member takes over)", flush=True)

    def report(self) -> dict:
        """This member's account of the job for a standby coordinator (``rebuild.Report``)."""
        with self._lock:
            report = Report(id=self.rank, host=socket.gethostname(), pid=os.getpid(), addr=self.addr,
                            standby_port=self._standby_port(), generation=self.generation, roles=dict(self.roles),
                            plan_steps=self._plan_steps, steps_done=int(self.progress() or 0),
                            checkin=self._pending_checkin, checked_in_for=self._checked_in_for,
                            round_seen=self._round_announced, finished=self._finished)
        return dict(report.as_message(), num_stages=self.num_stages, dp=self.dp)

    def start_standby(self, position: int) -> bool:
        """This member is the first live one in the standby list: start the coordinator on its
        reserved port, and reserve a fresh one for a later failover."""
        if self._standby is None or self.cf is None:
            return False
        listener = self._standby
        pid, announce = standby.start(listener, self.rank, position, self.expect, self.cf, self.dp, self.log_dir)
        say(f"[member {self.rank}] started the standby coordinator (pid {pid}) at "
            f"{self.addr}:{listener.getsockname()[1]} ({announce})")
        listener.close()  # the coordinator holds it now: if it dies, a connect is refused at once
        self._standby, _ = standby.reserve(self.addr)
        return True

    def reconnected(self, sock, welcome: dict, address) -> None:
        """Registered with a standby coordinator (its connection already out of the data plane's
        reach, ``connect_socket``): repeat a check-in or a finish its report may not have carried."""
        self._send_checkin()
        if self._finished:
            self.client.send({"op": "finished"})
