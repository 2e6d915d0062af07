"""Who is in the job and who holds which stage: the coordinator's state, as pure data.

A member is a process, named by an id the coordinator hands out (a process launched by
``mpirun`` asks for its ``COMM_WORLD`` rank, a joiner gets the next free id), never by an
MPI rank: deaths, evictions and joins can then go on for any number of generations.

Every change of who holds a stage is a *round*: the coordinator tells the members, each
live member checks in (its completed steps, whether it still holds its stage's state),
and when every live member has checked in the coordinator publishes one ``Plan`` for the
next generation. Members that die during a round simply leave it; a lost stage with no
spare waits up to ``join_wait_s`` for a joiner, then the job stops with a named reason.

Everything here is a function of the calls made and the clock passed in: ``Roster`` sends
nothing, it returns ``Out`` messages for the thin server (``coordinator``) to deliver.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

STOP_NO_REPLACEMENT = "no_replacement"
STOP_NO_MEMBERS = "no_members"


@dataclass
class Member:
    id: int
    host: str
    pid: int
    addr: str
    last_beat: float
    joined_at: float
    joiner: bool = False
    #: the port this member reserved for a standby coordinator at ``addr`` (None: it cannot host one)
    standby_port: int | None = None


@dataclass
class CheckIn:
    steps_done: int
    has_state: bool


@dataclass
class Plan:
    """One generation's roles; identical for every member that receives it."""
    generation: int
    roles: dict[int, int | None]       # member id -> stage (None: spare)
    hosts: dict[int, str]
    pids: dict[int, int]
    dead: list[int]                    # members gone since the previous plan
    evicted: list[int]                 # of those, the ones declared dead by silence (maybe alive)
    lost: list[int]                    # stages whose state is gone: rebuilt by the recovery rules
    replacements: dict[int, int]       # stage -> member id that takes it this generation
    resume_step: int
    fresh: bool                        # no step completed yet: every stage is built from the seed
    why: str = ""

    def as_message(self) -> dict:
        msg = asdict(self)
        msg["op"] = "plan"
        return msg

    @staticmethod
    def from_message(msg: dict) -> "Plan":
        def ints(d):  # JSON object keys arrive as strings
            return {int(k): v for k, v in d.items()}
        return Plan(generation=msg["generation"], roles=ints(msg["roles"]), hosts=ints(msg["hosts"]),
                    pids=ints(msg["pids"]), dead=list(msg["dead"]), evicted=list(msg["evicted"]),
                    lost=list(msg["lost"]), replacements={int(k): int(v) for k, v in msg["replacements"].items()},
                    resume_step=msg["resume_step"], fresh=msg["fresh"], why=msg.get("why", ""))


@dataclass
class Out:
    """A message for the server to deliver: to these members, or close their connection."""
    to: list[int]
    msg: dict
    close: bool = False


@dataclass
class _Round:
    generation: int
    started: float
    why: str
    checkins: dict[int, CheckIn] = field(default_factory=dict)
    vacancy_since: float | None = None


class Roster:
    """The coordinator's view: members, roles, rounds, verdicts."""

    def __init__(self, num_stages: int, expect: int, dead_after: float, startup_wait_s: float,
                 join_wait_s: float, now: float, dp: int = 1):
        """``dp`` data-parallel replicas: the roles are ``num_stages * dp`` slots, slot
        ``s`` = stage ``s // dp``, replica ``s % dp`` (DeepSpeed's rank order)."""
        if expect < num_stages * dp:
            raise ValueError(f"expect = {expect} processes cannot hold {num_stages} stages x {dp} replicas")
        self.num_stages, self.expect, self.dp = num_stages * dp, expect, dp
        self.dead_after, self.join_wait_s = dead_after, join_wait_s
        self.started_at = now
        self.startup_deadline = now + startup_wait_s
        self.members: dict[int, Member] = {}
        #: members admitted to the job (the last plan's roles, plus spares admitted since)
        self.roles: dict[int, int | None] = {}
        self.generation = 0
        self.round: _Round | None = _Round(1, now, "start-up")
        self.gone: dict[int, str] = {}         # member id -> why it left
        self.evicted: dict[int, Member] = {}   # declared dead while its connection stayed open
        self.since_plan_dead: list[int] = []
        self.since_plan_evicted: list[int] = []
        self.best_steps = 0                    # the highest completed step any stage holder reported
        self.phase = "gathering"               # gathering | running | stopped | done
        self.stop_reason: dict | None = None
        self._next_joiner = expect
        #: hand-offs a plan told a member to load, (generation, slot, after_step), until every
        #: stage holder is past them (``settled_handoffs``); and each member's last completed step
        self.pending_handoffs: list[tuple[int, int, int]] = []
        self.progress: dict[int, int] = {}

    # -- arrivals ----------------------------------------------------------------------
    def hello(self, id_hint: int | None, host: str, pid: int, addr: str, now: float,
              standby_port: int | None = None) -> tuple[int | None, list[Out]]:
        """A process asks to be a member: its id (None: refused) and the messages it causes."""
        if self.phase in ("stopped", "done"):
            return None, []
        joiner = id_hint is None or id_hint in self.members or id_hint in self.gone or id_hint >= self.expect
        if joiner:
            mid, self._next_joiner = self._next_joiner, self._next_joiner + 1
        else:
            mid = id_hint
        self.members[mid] = Member(mid, host, pid, addr, last_beat=now, joined_at=now, joiner=joiner,
                                   standby_port=standby_port)
        out = []
        if self.round is not None:  # start-up, or a round open: check in to take part in it
            out.append(Out([mid], {"op": "round", "generation": self.round.generation, "why": self.round.why}))
        else:  # nothing vacant: a spare at once, the data plane does not change
            out += self.admit_spare(mid, now)
        return mid, out + self.tick(now)

    def beat(self, mid: int, now: float, steps_done: int | None = None) -> None:
        m = self.members.get(mid)
        if m is not None:
            m.last_beat = now
            if steps_done is not None:
                self.progress[mid] = int(steps_done)

    # -- departures --------------------------------------------------------------------
    def disconnected(self, mid: int, now: float) -> list[Out]:
        """The member's connection closed: its process is gone (or it left)."""
        return self._remove(mid, "connection closed", now, evicted=False)

    def _remove(self, mid: int, why: str, now: float, evicted: bool) -> list[Out]:
        m = self.members.pop(mid, None)
        if m is None:
            return []
        self.gone[mid] = why
        out: list[Out] = []
        if evicted:
            self.evicted[mid] = m
            out.append(Out([mid], {"op": "evicted", "why": why}, close=True))
        if self.phase in ("stopped", "done"):
            return out
        admitted = mid in self.roles
        was_stage = self.roles.pop(mid, None) is not None
        if admitted:
            self.since_plan_dead.append(mid)
            if evicted:
                self.since_plan_evicted.append(mid)
        if was_stage and self.round is None and self.phase == "running":
            out += self._start_round(now, f"member {mid} lost ({why})")
        out.append(Out(self._live_admitted(), {"op": "member_lost", "member": mid, "why": why,
                                               "evicted": evicted, "at_generation": self.generation}))
        return out + self.tick(now)

    # -- rounds ------------------------------------------------------------------------
    def _start_round(self, now: float, why: str) -> list[Out]:
        self.round = _Round(self.generation + 1, now, why)
        return [Out(self._live_admitted(), {"op": "round", "generation": self.round.generation, "why": why})]

    def checkin(self, mid: int, steps_done: int, has_state: bool, now: float,
                for_generation: int | None = None) -> list[Out]:
        """A member is ready for the plan of ``for_generation`` (it has torn down its data
        plane). A check-in for a generation already planned is stale and ignored."""
        if mid not in self.members or self.phase in ("stopped", "done"):
            return []
        out: list[Out] = []
        if self.round is None:
            if mid not in self.roles:  # a joiner whose round ended without it: a spare, no new round
                return self.admit_spare(mid, now)
            if for_generation is not None and for_generation <= self.generation:
                return []
            out += self._start_round(now, f"member {mid} checked in")
        self.round.checkins[mid] = CheckIn(int(steps_done), bool(has_state))
        return out + self.tick(now)

    def tick(self, now: float) -> list[Out]:
        """Verdicts on silent members, then a plan if the open round is complete."""
        out: list[Out] = []
        for mid, m in sorted(self.members.items()):
            if now - m.last_beat > self.dead_after:
                out += self._remove(mid, f"no heartbeat for {now - m.last_beat:.1f} s", now, evicted=True)
        if self.phase in ("stopped", "done"):
            return out
        if self.phase != "gathering" and not self.members:
            return out + self._stop(STOP_NO_MEMBERS, "every member is gone", [], now)
        if self.round is not None:
            out += self._maybe_plan(now)
        return out

    def _maybe_plan(self, now: float) -> list[Out]:
        rnd = self.round
        if self.phase == "gathering":
            if len(self.members) < self.expect and now < self.startup_deadline:
                return []
            if not self.members:
                return []
        waiting_on = [m for m in self.members if m not in rnd.checkins]
        # a joiner that has not checked in yet is not waited for (it is not a member yet)
        waiting_on = [m for m in waiting_on if m in self.roles or self.phase == "gathering"]
        if waiting_on:
            return []
        candidates = {m: c for m, c in rnd.checkins.items() if m in self.members}
        holders = {}  # stage -> member keeping its state
        for mid, c in candidates.items():
            stage = self.roles.get(mid)
            if stage is not None and c.has_state:
                holders[stage] = mid
        steps = [candidates[m].steps_done for m in holders.values()]
        best = max([self.best_steps] + steps)
        fresh = best == 0
        if fresh:  # nothing trained yet: whoever held a stage keeps it, state or not
            holders = {self.roles[m]: m for m in candidates if self.roles.get(m) is not None}
        new_roles: dict[int, int | None] = {mid: None for mid in candidates}
        for stage, mid in holders.items():
            new_roles[mid] = stage
        vacant = [s for s in range(self.num_stages) if s not in holders]
        replacements: dict[int, int] = {}
        free = sorted(m for m, r in new_roles.items() if r is None)
        if fresh:  # at a fresh start a process launched as rank s takes stage s when it can
            for s in list(vacant):
                if s in free:
                    replacements[s] = s
                    free.remove(s)
                    vacant.remove(s)
        for s in list(vacant):
            if not free:
                break
            replacements[s] = free.pop(0)
            vacant.remove(s)
        if vacant:
            if rnd.vacancy_since is None:
                rnd.vacancy_since = now
            if now - rnd.vacancy_since < self.join_wait_s:
                return []  # a joiner may still come
            return self._stop(STOP_NO_REPLACEMENT, f"{self.name_slots(vacant)} lost and no spare or joining process "
                              f"took them within join_wait_s = {self.join_wait_s:g} s", vacant, now)
        for s, mid in replacements.items():
            new_roles[mid] = s
        lost = [] if fresh else sorted(replacements)
        plan = Plan(generation=rnd.generation, roles=new_roles,
                    hosts={m: self.members[m].host for m in new_roles},
                    pids={m: self.members[m].pid for m in new_roles},
                    dead=sorted(set(self.since_plan_dead)), evicted=sorted(set(self.since_plan_evicted)),
                    lost=lost, replacements=replacements, resume_step=best + 1, fresh=fresh, why=rnd.why)
        self.roles, self.generation, self.round, self.best_steps = new_roles, rnd.generation, None, best
        self.since_plan_dead, self.since_plan_evicted = [], []
        self.pending_handoffs += [(plan.generation, slot, plan.resume_step - 1) for slot in lost]
        self.phase = "running"
        # a joiner that arrived during the round and has not checked in yet is admitted as a
        # spare when its check-in comes (``checkin``)
        return [Out(sorted(new_roles), plan.as_message())]

    def name_slots(self, slots: list[int]) -> str:
        """``stage(s) [1, 2]``, or with replicas ``stage.replica(s) ['1.0', '2.1']``."""
        if self.dp == 1:
            return f"stage(s) {slots}"
        return f"stage.replica(s) {[f'{s // self.dp}.{s % self.dp}' for s in slots]}"

    def _stop(self, reason: str, why: str, lost: list[int], now: float) -> list[Out]:
        self.phase = "stopped"
        self.round = None
        self.stop_reason = {"op": "stop", "reason": reason, "why": why, "lost": lost,
                            "dead": sorted(set(self.since_plan_dead)), "survivors": sorted(self.members),
                            "roles_before": {str(k): v for k, v in self.roles.items()}}
        return [Out(sorted(self.members), self.stop_reason)]

    # -- the end -----------------------------------------------------------------------
    def finished(self, mid: int, now: float) -> list[Out]:
        """Training completed (reported by a stage member): everyone leaves; the evicted
        processes' hosts and pids go with it, so a member on the same host can kill any that
        never woke up (a stopped process keeps ``mpirun`` from exiting)."""
        if self.phase == "done":
            return []
        self.phase = "done"
        self.round = None
        evicted = [{"id": m.id, "host": m.host, "pid": m.pid} for m in self.evicted.values()]
        return [Out(sorted(self.members), {"op": "done", "evicted": evicted, "by": mid})]

    # -- failover and hygiene ------------------------------------------------------------
    def standbys(self) -> list[list]:
        """Where a standby coordinator may start, in the order members try them after losing
        this coordinator: ``[id, addr, port]`` of every member that reserved a port, by id."""
        return [[m.id, m.addr, m.standby_port] for _, m in sorted(self.members.items())
                if m.standby_port is not None]

    def settled_handoffs(self) -> list[tuple[int, int]]:
        """(slot, after_step) of hand-offs no member will ask for again, removed from the pending
        list: a later plan was made (every member checked in after that rebuild), the job is over,
        or every stage holder completed a step after the one the hand-off resumes (each asks the
        store whether it exists before its first step of the generation, so none asks later)."""
        holders = [m for m, slot in self.roles.items() if slot is not None and m in self.members]
        settled, keep = [], []
        for generation, slot, after in self.pending_handoffs:
            done = (self.phase in ("done", "stopped") or generation < self.generation
                    or (generation == self.generation and self.round is None and holders
                        and all(self.progress.get(m, 0) > after for m in holders)))
            (settled if done else keep).append((generation, slot, after))
        self.pending_handoffs = keep
        return [(slot, after) for _, slot, after in settled]

    # -- helpers -----------------------------------------------------------------------
    def _live_admitted(self) -> list[int]:
        return sorted(m for m in self.members if m in self.roles or self.phase == "gathering")

    def admit_spare(self, mid: int, now: float) -> list[Out]:
        """A joiner that arrives while nothing is vacant becomes a spare without a round
        (the data plane does not change)."""
        if self.phase != "running" or self.round is not None or mid not in self.members:
            return []
        self.roles[mid] = None
        return [Out([mid], {"op": "admitted", "generation": self.generation, "id": mid})]
