"""A standby coordinator's roster, rebuilt from what the members report (pure, clock passed in).

When the coordinator is lost, its state is not: every member knows the last plan it applied
(generation, every member's role, the step that plan resumed from), its own last completed
step, and whether it is in the middle of a round (checked in, or told one is coming). The
members re-register with a standby coordinator (``failover``) with that ``Report``, and
``rebuild`` turns the reports into the ``Roster`` the lost coordinator would have had:

- the newest generation any member reports is the job's; its roles are the roster's roles;
- a member of that generation that did not report within the collection window is gone
  (a process that died with the coordinator's host): if it held a stage, a round opens and
  the lost stage is replaced as after any death;
- a round also opens when a member is behind (it missed the last plan) or was in a round
  when the coordinator died; check-ins it already made for that round count;
- a report of finished training ends the job (``done``); a member the newest plan no longer
  names (removed earlier, e.g. evicted while stopped) is evicted again;
- with nothing to change, no message is sent: the data plane is untouched.
"""
from __future__ import annotations

from dataclasses import dataclass

from ds_checkfree.elastic.membership.roster import CheckIn, Member, Out, Roster


@dataclass
class Report:
    """One member's account of the job, sent when it re-registers (``as_message`` / ``from_message``)."""
    id: int
    host: str
    pid: int
    addr: str
    standby_port: int | None
    generation: int                 # the last plan this member applied (0: none yet)
    roles: dict[int, int | None]    # that plan's roles: member id -> slot (None: spare)
    plan_steps: int                 # steps completed when that plan was made (its resume step - 1)
    steps_done: int                 # this member's last completed step
    checkin: CheckIn | None = None  # a check-in still waiting for its plan ...
    checked_in_for: int = 0         # ... for this generation
    round_seen: int = 0             # the highest generation a round was announced for
    finished: bool = False          # training completed on this member

    def as_message(self) -> dict:
        return {"op": "rejoin", "id": self.id, "host": self.host, "pid": self.pid, "addr": self.addr,
                "standby_port": self.standby_port, "generation": self.generation,
                "roles": {str(k): v for k, v in self.roles.items()}, "plan_steps": self.plan_steps,
                "steps_done": self.steps_done,
                "checkin": None if self.checkin is None else [self.checkin.steps_done, self.checkin.has_state],
                "checked_in_for": self.checked_in_for, "round_seen": self.round_seen, "finished": self.finished}

    @staticmethod
    def from_message(msg: dict) -> "Report":
        checkin = msg.get("checkin")
        return Report(id=int(msg["id"]), host=msg.get("host", "?"), pid=int(msg.get("pid", 0)),
                      addr=msg.get("addr", "?"), standby_port=msg.get("standby_port"),
                      generation=int(msg.get("generation", 0)),
                      roles={int(k): v for k, v in (msg.get("roles") or {}).items()},
                      plan_steps=int(msg.get("plan_steps", 0)), steps_done=int(msg.get("steps_done", 0)),
                      checkin=None if checkin is None else CheckIn(int(checkin[0]), bool(checkin[1])),
                      checked_in_for=int(msg.get("checked_in_for", 0)), round_seen=int(msg.get("round_seen", 0)),
                      finished=bool(msg.get("finished", False)))

    @property
    def mid_round(self) -> bool:
        return max(self.checked_in_for, self.round_seen) > self.generation


NOT_REREGISTERED = "did not re-register after the coordinator was lost"


def not_reregistered(roster: Roster) -> list[int]:
    """The members a rebuild removed because their reports never came (named in the log)."""
    return sorted(m for m, why in roster.gone.items() if why == NOT_REREGISTERED)


def expected_members(reports: list[Report]) -> set[int]:
    """The members the newest reported plan names: the collection is complete once all reported."""
    if not reports:
        return set()
    newest = max(reports, key=lambda r: r.generation)
    return set(newest.roles) | {r.id for r in reports}


def rebuild(reports: list[Report], num_stages: int, expect: int, dead_after: float, startup_wait_s: float,
            join_wait_s: float, now: float, dp: int = 1) -> tuple[Roster, list[Out]]:
    """The roster the lost coordinator would have had, and the messages that follow from it."""
    roster = Roster(num_stages, expect, dead_after, startup_wait_s, join_wait_s, now, dp=dp)
    by_id = {r.id: r for r in reports}
    for r in reports:
        roster.members[r.id] = Member(r.id, r.host, r.pid, r.addr, last_beat=now, joined_at=now,
                                      joiner=r.id >= expect, standby_port=r.standby_port)
        roster.progress[r.id] = r.steps_done
    roster._next_joiner = max([expect] + [i + 1 for r in reports for i in (r.id, *r.roles)])
    if any(r.finished for r in reports):  # training completed: everyone leaves
        return roster, roster.finished(min(r.id for r in reports if r.finished), now)
    generation = max((r.generation for r in reports), default=0)
    if generation == 0:  # lost while the job was forming: the start-up round goes on
        for r in reports:
            if r.checkin is not None:
                roster.round.checkins[r.id] = r.checkin
        return roster, [Out(sorted(roster.members), {"op": "round", "generation": 1, "why": "start-up"})] \
            + roster.tick(now)
    newest = [r for r in reports if r.generation == generation]
    roster.phase, roster.round, roster.generation = "running", None, generation
    roster.roles = dict(sorted(newest[0].roles.items()))
    roster.best_steps = max(r.plan_steps for r in newest)
    out: list[Out] = []
    for r in reports:
        if r.id in roster.roles:
            continue
        if r.generation == 0:  # a joiner admitted as a spare (or still waiting for its first plan)
            roster.roles[r.id] = None
        else:  # a plan it applied named it, the newest does not: it was removed (evicted while stopped)
            roster.members.pop(r.id)
            roster.gone[r.id] = "removed from the job before the coordinator was lost"
            out.append(Out([r.id], {"op": "evicted", "why": roster.gone[r.id]}, close=True))
    missing = sorted(m for m in roster.roles if m not in by_id)
    behind = sorted(r.id for r in reports if r.id in roster.roles and (r.generation < generation or r.mid_round))
    if behind or any(roster.roles[m] is not None for m in missing):
        why = (f"coordinator replaced: member(s) {behind} were in a round or behind the newest plan"
               if behind else f"coordinator replaced: member(s) {missing} did not re-register")
        out += roster._start_round(now, why)
        for r in reports:
            if r.checkin is not None and r.checked_in_for == roster.round.generation and r.id in roster.roles:
                roster.round.checkins[r.id] = r.checkin
    for mid in missing:  # never reconnected within the window: gone, like a closed connection
        roster.members[mid] = Member(mid, "?", 0, "?", last_beat=now, joined_at=now)
        out += roster._remove(mid, NOT_REREGISTERED, now, evicted=False)
    return roster, out + roster.tick(now)


def rejoin(roster: Roster, report: Report, now: float) -> tuple[bool, list[Out]]:
    """A member re-registering after the roster was rebuilt (it reconnected late, or its
    connection alone broke): taken back when the roster still counts it, else refused (the job
    went on without it). Its pending check-in counts toward the open round."""
    member = roster.members.get(report.id)
    if member is None and roster.phase == "gathering" and report.id not in roster.gone:
        mid, out = roster.hello(report.id, report.host, report.pid, report.addr, now, report.standby_port)
        if mid == report.id:  # the job is still forming: a late member is simply one more hello
            return True, out
        roster.members.pop(mid, None)
        return False, []
    if member is None or roster.phase in ("stopped", "done"):
        return False, []
    member.host, member.pid, member.addr = report.host, report.pid, report.addr
    member.standby_port, member.last_beat = report.standby_port, now
    roster.progress[report.id] = report.steps_done
    out: list[Out] = []
    if report.finished:
        return True, roster.finished(report.id, now)
    if report.checkin is not None:
        out += roster.checkin(report.id, report.checkin.steps_done, report.checkin.has_state, now,
                              report.checked_in_for)
    elif roster.round is not None:
        out.append(Out([report.id], {"op": "round", "generation": roster.round.generation, "why": roster.round.why}))
    return True, out + roster.tick(now)
