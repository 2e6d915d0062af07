"""Churn past one machine, on paper: an event-driven simulator of the fault-tolerant launch.

What it models (pure python; the times come from measurements, the rules from the code):

- S stages x R replicas = N slots, each held by a node that fails independently with a
  constant hazard: ``rate_per_hour`` is the probability of failing within an hour (the paper's
  "per stage per hour", per node here), ``-ln(1 - h) / 3600`` per second. Idle spares fail too
  (they just leave the pool). A failure is a crash (seen within ``detection`` of the measured
  phase model) or, with probability ``stall_fraction``, a hang (seen after the heartbeat timeout).
- Every slot failure stops the whole synchronous job: the step in flight is lost (a uniform
  fraction of a step), then the recovery phases as measured (``PhaseModel``: teardown,
  agreement, data plane, engine rebuild, re-materialisation, each against the job's size from
  ``recovery_scaling.csv``); the interrupted step is then redone as an ordinary step. A
  failure inside a recovery window joins it and costs a re-agreement (the phases again).
- Each lost slot takes a spare; with none left the job waits for a joiner (ready spares arrive
  as a Poisson process, ``joins_per_hour``, each ``join_latency_s`` after it arrived) and stops
  when none comes within ``join_wait_s``.
- What can be rebuilt is decided by the code's own rule (``ds_checkfree.recovery.rules.plan_recovery``)
  on the stages whose every replica was lost in one window (a stage with a live replica is an
  exact copy); no rule: roll back to the checkpoint (``fallback="checkpoint"``: the steps since
  it are lost, plus its load time) or the job stops (``fallback="stop"``).

Goodput = useful step time / wall time until the horizon or the stop; survival = reaching the
horizon. ``python -m benchmarks.churn_sim`` writes the validation against the measured runs
and the predictions (``benchmarks/churn_sim_report.py``).
"""
from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field

#: the recovery phases after detection, as ``recovery_scaling.csv`` names them
DOWNTIME_PHASES = ("teardown_s", "agreement_s", "data_plane_s", "engine_rebuild_s", "rematerialise_s")
#: the phases a failure inside a recovery window repeats (the members agree and rebuild again)
REFORM_PHASES = ("agreement_s", "data_plane_s", "engine_rebuild_s", "rematerialise_s")
FALLBACKS = ("checkpoint", "stop")


def hazard_per_s(rate_per_hour: float) -> float:
    """A node's constant failure hazard from the probability of failing within an hour."""
    if not 0 <= rate_per_hour < 1:
        raise ValueError(f"rate_per_hour {rate_per_hour!r}: a probability per hour in [0, 1), e.g. 0.1 for 10 %/h")
    return -math.log1p(-rate_per_hour) / 3600.0


def step_failure_probability(rate_per_hour: float, step_s: float) -> float:
    """The paper's per-iteration probability ``1 - (1 - h) ** (t / 3600)`` (one node)."""
    return 1.0 - (1.0 - rate_per_hour) ** (step_s / 3600.0)


@dataclass(frozen=True)
class PhaseModel:
    """Seconds of each phase against the job's size (ranks, spare included): through the median
    of each measured size (piecewise linear), constant below the smallest, and beyond the largest
    along the least-squares slope of those medians (never negative: noise is no trend)."""
    points: dict  # phase -> ((ranks, seconds), ...), ranks ascending
    slopes: dict  # phase -> seconds per rank beyond the largest measured size

    @staticmethod
    def fit(rows: list[dict]) -> "PhaseModel":
        if not rows:
            raise ValueError("no measured kills to fit the phase model on (run benchmarks/recovery_scaling.py)")
        points, slopes = {}, {}
        for phase in ("detection_s", *DOWNTIME_PHASES):
            sizes = sorted({int(r["ranks"]) for r in rows})
            pts = tuple((n, statistics.median(float(r[phase]) for r in rows if int(r["ranks"]) == n)) for n in sizes)
            mx, my = statistics.fmean(x for x, _ in pts), statistics.fmean(y for _, y in pts)
            sxx = sum((x - mx) ** 2 for x, _ in pts)
            slope = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx > 0 else 0.0
            points[phase], slopes[phase] = pts, max(0.0, slope)
        return PhaseModel(points, slopes)

    @staticmethod
    def constant(seconds: dict) -> "PhaseModel":
        """Every phase the same at every size (``seconds``: phase -> s)."""
        return PhaseModel({p: ((1, v),) for p, v in seconds.items()}, {p: 0.0 for p in seconds})

    def phase(self, name: str, ranks: int) -> float:
        pts = self.points[name]
        if ranks <= pts[0][0]:
            return pts[0][1]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if ranks <= x1:
                return y0 + (y1 - y0) * (ranks - x0) / (x1 - x0)
        return pts[-1][1] + self.slopes[name] * (ranks - pts[-1][0])

    def downtime(self, ranks: int) -> float:
        """Detection of a crash to the rebuilt stage ready (the redone step not included)."""
        return self.phase("detection_s", ranks) + sum(self.phase(p, ranks) for p in DOWNTIME_PHASES)

    def reform(self, ranks: int) -> float:
        return sum(self.phase(p, ranks) for p in REFORM_PHASES)


@dataclass
class SimConfig:
    stages: int
    replicas: int = 1
    spares: int = 1
    mode: str = "checkfree"            # the code's mode: "checkfree" or "checkfree_plus"
    layout: str = "all_stages_fail"    # or "paper": stages 0 and S-1 (embedding, head) never fail
    rate_per_hour: float = 0.1         # per node
    step_s: float = 1.0
    horizon_s: float = 24 * 3600.0
    stall_fraction: float = 0.0        # failures that are hangs, seen after the heartbeat timeout
    heartbeat_timeout_s: float = 10.0
    joins_per_hour: float = 0.0        # ready spares arriving (volunteers); 0: only the initial spares
    join_latency_s: float = 7.0        # arrival -> admitted as a spare (measured: recovery_scaling)
    join_wait_s: float | None = 60.0   # out of spares: how long the job waits for a joiner (None: forever)
    max_spares: int | None = None      # pool cap for arriving joiners (None: unbounded)
    fallback: str = "stop"
    checkpoint_every_steps: int = 100
    checkpoint_load_s: float = 10.0
    rebuild_penalty_steps: float = 0.0  # convergence cost of one rule-rebuilt stage, in steps (0: none)
    extra_downtime_s: float = 0.0       # per recovery, beyond the measured phases (a stage's state over a WAN)
    fixed_ranks: int | None = None      # evaluate the phase model at this size (a rebuild of the neighbourhood only)

    def __post_init__(self):
        if self.stages < 3 or self.replicas < 1 or self.spares < 0:
            raise ValueError(f"{self.stages} stages x {self.replicas} replicas + {self.spares} spares: "
                             "need >= 3 stages, >= 1 replica, >= 0 spares")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback {self.fallback!r}: choose one of {FALLBACKS}")
        if self.step_s <= 0 or self.horizon_s <= 0:
            raise ValueError("step_s and horizon_s must be positive (seconds)")
        hazard_per_s(self.rate_per_hour)
        if self.layout not in ("all_stages_fail", "paper"):
            raise ValueError(f"layout {self.layout!r}: choose 'all_stages_fail' or 'paper'")

    @property
    def slots(self) -> int:
        return self.stages * self.replicas

    @property
    def ranks(self) -> int:
        """The job size the phase model is evaluated at."""
        return self.fixed_ranks if self.fixed_ranks is not None else self.slots + self.spares

    def failing_slots(self) -> list[int]:
        """Slots whose node can fail (layout "paper": not the embedding's and the head's stages)."""
        immune = {0, self.stages - 1} if self.layout == "paper" else set()
        return [s for s in range(self.slots) if s // self.replicas not in immune]


@dataclass
class Outcome:
    goodput: float          # useful step time / wall time (until the horizon or the stop)
    progress: float         # useful step time / horizon (a stopped job makes none after it stopped)
    survived: bool
    wall_s: float
    failures: int = 0       # slot failures (idle spares not counted)
    recoveries: int = 0     # recovery windows
    rollbacks: int = 0
    waits_for_joiners: int = 0
    stop_reason: str = ""
    events: list = field(default_factory=list)  # (time, what) when asked for


def lost_columns(lost_slots: set[int], replicas: int) -> set[int]:
    """Stages whose every replica is among ``lost_slots`` (slot = stage * replicas + replica)."""
    stages = {s // replicas for s in lost_slots}
    return {st for st in stages if all(st * replicas + r in lost_slots for r in range(replicas))}


def rebuildable(columns: set[int], cfg: SimConfig) -> bool:
    """Whether the code's rule rebuilds these lost stages without a checkpoint."""
    if not columns:
        return True
    from ds_checkfree.recovery.rules import UnrecoverableFailure, plan_recovery
    try:
        plan_recovery(sorted(columns), cfg.stages, cfg.mode, layout=cfg.layout)
        return True
    except UnrecoverableFailure:
        return False


class _Clock:
    """Failure and join events: random (``rng``) or a fixed ``schedule`` of (time, slot or
    "spare", stall). One failure is pending at a time; a random one is redrawn when the number
    of live nodes changes (the hazard is memoryless)."""

    def __init__(self, cfg: SimConfig, rng: random.Random, schedule=None):
        self.cfg, self.rng = cfg, rng
        self.schedule = sorted(schedule, key=lambda e: e[0]) if schedule is not None else None
        self.lam = hazard_per_s(cfg.rate_per_hour)
        self.mu = cfg.joins_per_hour / 3600.0
        self.next_join = self._draw_join(0.0)
        self._pending = None
        self.failing = cfg.failing_slots()

    def _draw_join(self, now: float) -> float:
        return now + self.rng.expovariate(self.mu) + self.cfg.join_latency_s if self.mu > 0 else math.inf

    def take_join(self) -> float:
        """The next ready spare's arrival time (then the one after it is drawn)."""
        at, self.next_join = self.next_join, self._draw_join(self.next_join - self.cfg.join_latency_s)
        return at

    def peek(self, now: float, spares: int, lost: set) -> tuple:
        """(time, slot or "spare", stall) of the next failure after ``now``; ``lost``: slots
        already down in this window (they cannot fail again)."""
        if self._pending is None:
            self._pending = self._draw(now, spares, lost)
        return self._pending

    def consume(self) -> None:
        self._pending = None

    def changed(self) -> None:
        """The live nodes changed (a join): a random pending failure is redrawn."""
        if self.schedule is None:
            self._pending = None

    def _draw(self, now: float, spares: int, lost: set) -> tuple:
        if self.schedule is not None:
            while self.schedule and self.schedule[0][0] < now:
                self.schedule.pop(0)
            return self.schedule.pop(0) if self.schedule else (math.inf, None, False)
        holders = len(self.failing) - len(lost)
        alive = holders + spares
        if self.lam == 0 or alive <= 0:
            return math.inf, None, False
        at = now + self.rng.expovariate(self.lam * alive)
        pick = self.rng.randrange(alive)
        if pick >= holders:
            return at, "spare", False
        who = [s for s in self.failing if s not in lost][pick] if lost else self.failing[pick]
        return at, who, self.rng.random() < self.cfg.stall_fraction


def simulate(cfg: SimConfig, model: PhaseModel, rng: random.Random | None = None, schedule=None,
             trace: bool = False) -> Outcome:
    """One run to ``cfg.horizon_s``. ``schedule``: fixed failures instead of random ones."""
    rng = rng or random.Random(0)
    clock = _Clock(cfg, rng, schedule)
    t, useful, spares, resumed = 0.0, 0.0, cfg.spares, 0.0
    out = Outcome(0.0, 0.0, True, 0.0)
    ranks = cfg.ranks

    def note(what):
        if trace:
            out.events.append((round(t, 4), what))

    def stop(why):
        out.survived, out.stop_reason = False, why
        note(f"stop: {why}")

    while out.survived:
        at, who, stall = clock.peek(t, spares, set())
        if clock.next_join <= min(at, cfg.horizon_s):  # a ready spare arrives while the job runs
            arrive = clock.take_join()
            useful += max(0.0, arrive - t)
            t = max(t, arrive)
            spares = spares + 1 if cfg.max_spares is None else min(cfg.max_spares, spares + 1)
            clock.changed()
            continue
        if at >= cfg.horizon_s:
            useful += cfg.horizon_s - t
            t = cfg.horizon_s
            break
        clock.consume()
        useful += at - t
        t = at
        if who == "spare":
            spares -= 1
            note("idle spare lost")
            continue
        out.failures += 1
        useful -= min(rng.random() * cfg.step_s, t - resumed)  # the step in flight is lost
        lost = {who}
        end = t + (cfg.heartbeat_timeout_s if stall else 0.0) + model.downtime(ranks) + cfg.extra_downtime_s
        note(f"slot {who} lost{' (stall)' if stall else ''}")
        while True:  # failures inside the window join it and cost a re-agreement
            nxt, nwho, nstall = clock.peek(t, spares, lost)
            if nxt >= end:
                break
            clock.consume()
            t = nxt
            if nwho == "spare":
                spares -= 1
                continue
            out.failures += 1
            lost.add(nwho)
            seen = cfg.heartbeat_timeout_s if nstall else model.phase("detection_s", ranks)
            end = max(end, t + seen + model.reform(ranks))
            note(f"slot {nwho} lost during the recovery")
        out.recoveries += 1
        t = end
        need = len(lost)
        take = min(spares, need)
        spares -= take
        for _ in range(need - take):  # no spare: wait for joiners
            out.waits_for_joiners += 1
            arrive = clock.take_join()
            if arrive == math.inf or cfg.join_wait_s is not None and arrive - t > cfg.join_wait_s:
                t = min(cfg.horizon_s, t + (cfg.join_wait_s if cfg.join_wait_s is not None else 0.0))
                stop("no spare and no joiner within join_wait_s")
                break
            if arrive > t:
                t = arrive + model.reform(ranks)  # the joiner is admitted and the group formed again
        if not out.survived:
            break
        clock.changed()
        columns = lost_columns(lost, cfg.replicas)
        if not rebuildable(columns, cfg):
            if cfg.fallback == "stop":
                stop(f"stages {sorted(columns)} lost together have no rule (adjacent, or an edge under checkfree)")
                break
            out.rollbacks += 1
            useful -= rng.random() * cfg.checkpoint_every_steps * cfg.step_s
            t += cfg.checkpoint_load_s
            note("rolled back to the checkpoint")
        else:
            useful -= len(columns) * cfg.rebuild_penalty_steps * cfg.step_s
        resumed = t
        if t >= cfg.horizon_s:
            t = cfg.horizon_s
            break
    out.wall_s = t
    useful = max(0.0, min(useful, t))
    out.goodput = useful / t if t > 0 else 0.0
    out.progress = useful / cfg.horizon_s
    return out


def monte_carlo(cfg: SimConfig, model: PhaseModel, runs: int = 200, seed: int = 0) -> dict:
    """Mean goodput (and its 95% normal CI), mean progress, survival to the horizon, failures."""
    if runs < 2:
        raise ValueError("runs must be >= 2 (a mean and its spread)")
    outs = [simulate(cfg, model, random.Random(seed * 100003 + i)) for i in range(runs)]
    g = [o.goodput for o in outs]
    half = 1.96 * statistics.stdev(g) / math.sqrt(runs)
    return {"goodput": statistics.fmean(g), "goodput_ci": half,
            "progress": statistics.fmean(o.progress for o in outs),
            "survival": sum(o.survived for o in outs) / runs,
            "failures_per_h": statistics.fmean(o.failures / (o.wall_s / 3600) for o in outs if o.wall_s > 0),
            "rollbacks": statistics.fmean(o.rollbacks for o in outs), "runs": runs}


def predicted_recovery(model: PhaseModel, ranks: int, step_s: float, *, stall_timeout_s: float = 0.0,
                       second_after_s: float | None = None, join_after_s: float | None = None,
                       join_latency_s: float = 0.0) -> float:
    """Kill -> next completed step for one scenario, by the same accounting as ``simulate``:
    detection (or the heartbeat timeout) + the phases (+ a re-agreement for a second loss
    inside the window, + the wait for a joiner) + the redone step."""
    total = (stall_timeout_s or 0.0) + model.downtime(ranks)
    if second_after_s is not None:
        if second_after_s < total:  # inside the window: one re-agreement
            total = max(total, second_after_s + model.phase("detection_s", ranks) + model.reform(ranks))
        elif second_after_s < total + step_s:  # during the redone step: a recovery of its own
            total = second_after_s + model.downtime(ranks)
    if join_after_s is not None:
        total = max(total, join_after_s + join_latency_s + model.reform(ranks))
    return total + step_s


def per_iteration_survival(blocks: int, p: float, iterations: int) -> float:
    """The paper's time model, for comparison: every block stage fails with probability ``p``
    per iteration and the failures of one iteration are recovered together, so two adjacent
    block stages failing in the same iteration stop plain CheckFree. Exact over the chain:
    the probability that an iteration has no two adjacent failures, to the ``iterations``."""
    ok_last_up, ok_last_down = 1.0 - p, p  # chains of length 1 without adjacent failures, by last stage
    for _ in range(blocks - 1):
        ok_last_up, ok_last_down = (ok_last_up + ok_last_down) * (1.0 - p), ok_last_up * p
    return (ok_last_up + ok_last_down) ** iterations
