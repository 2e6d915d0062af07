"""Failure injection as a library: rates, seeds, explicit failures, replayable schedules.

The same object drives tests, the engine and the benchmarks. Every decision is a pure
function of ``(seed, step, stage)`` so that all ranks, and every recovery strategy run
with the same seed, see exactly the same failures, no matter in which order (or how
often) steps are queried.
"""
from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Union

from ds_checkfree.config.modes import FAILURE_DRAWS, RATE_PRESETS

CAUSES = ("fail_at", "rate", "schedule_file", "process_lost")

FailAtSpec = Union[str, tuple[int, int], tuple[int, int, int]]



def step_failure_probability(rate_percent_per_hour: float, step_seconds: float) -> float:
    """Per-step failure probability of one stage, ``1 - (1 - H/100) ** (T/3600)``.

    The paper's failure model: a stage that fails with probability H% within an hour,
    failing independently in each step of T seconds, fails in a given step with this p.
    """
    h, t = float(rate_percent_per_hour), float(step_seconds)
    if not math.isfinite(h) or not 0.0 <= h < 100.0:
        raise ValueError(f"rate_percent_per_hour must be in [0, 100), got {rate_percent_per_hour!r}")
    if not math.isfinite(t) or t <= 0.0:
        raise ValueError(f"step_seconds must be a finite number > 0, got {step_seconds!r}")
    return 1.0 - (1.0 - h / 100.0) ** (t / 3600.0)


def hourly_rate_percent(step_probability: float, step_seconds: float) -> float:
    """The inverse of ``step_failure_probability``: %/h of a per-step probability at T s/step."""
    p, t = float(step_probability), float(step_seconds)
    if not math.isfinite(p) or not 0.0 <= p < 1.0 or not math.isfinite(t) or t <= 0.0:
        raise ValueError(f"need 0 <= step_probability < 1 and step_seconds > 0, got {step_probability!r}, "
                         f"{step_seconds!r}")
    return 100.0 * (1.0 - (1.0 - p) ** (3600.0 / t))


def rate_label(rate_percent_per_hour: float = 0.0, step_seconds: float | None = None,
               step_probability: float | None = None, preset: str | None = None) -> dict | None:
    """How a failure rate is reported everywhere (run.json, events, the log): the per-step
    probability and the %/h it means at the assumed step time, with where each came from.
    A rate is only comparable across runs with both: the same %/h is a different p at another
    step time. A preset without an assumed step time is labelled at the step time its own
    (p, %/h) pair implies. None when no rate is set."""
    if preset is not None:
        p, nominal = RATE_PRESETS[preset]
        implied = 3600.0 * math.log(1.0 - p) / math.log(1.0 - nominal / 100.0)
        t = implied if step_seconds is None else float(step_seconds)
        return {"per_step_probability": p, "percent_per_hour": hourly_rate_percent(p, t), "step_seconds": t,
                "step_seconds_from": "preset" if step_seconds is None else "assumed_step_seconds",
                "source": f"preset {preset}", "preset_percent_per_hour": nominal}
    if step_probability is not None and step_probability > 0:
        return {"per_step_probability": float(step_probability),
                "percent_per_hour": hourly_rate_percent(step_probability, step_seconds),
                "step_seconds": float(step_seconds), "step_seconds_from": "assumed_step_seconds",
                "source": "failure_probability"}
    if rate_percent_per_hour > 0:
        return {"per_step_probability": step_failure_probability(rate_percent_per_hour, step_seconds),
                "percent_per_hour": float(rate_percent_per_hour), "step_seconds": float(step_seconds),
                "step_seconds_from": "assumed_step_seconds", "source": "failure_rate"}
    return None


def describe_rate(label: dict | None) -> str:
    """One line for the log: both units, always together."""
    if label is None:
        return "no random failures"
    return (f"failure rate {label['percent_per_hour']:.3g} %/h per stage at {label['step_seconds']:.4g} s/step "
            f"= p {label['per_step_probability']:.4g} per stage per step ({label['source']})")


@dataclass(frozen=True, order=True)
class Failure:
    """One stage lost at the start of one step, and why it was lost.

    ``replica``: the data-parallel replica that is lost, or None for every replica of the
    stage (what rates, schedule files and ``"STAGE:STEP"`` entries mean)."""
    step: int
    stage: int
    cause: str
    replica: int | None = None
    #: the executed step (loop iteration, redone steps counted) it was drawn for, when known
    executed: int | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.cause not in CAUSES:
            raise ValueError(f"unknown failure cause {self.cause!r}; expected one of {CAUSES}")


def parse_fail_at(text: str) -> tuple[int, ...]:
    """Parse ``"STAGE:STEP"`` into ``(stage, step)`` and ``"STAGE.REPLICA:STEP"`` into
    ``(stage, step, replica)`` (stage, replica >= 0, step >= 1)."""
    expected = ("expected 'STAGE:STEP' or 'STAGE.REPLICA:STEP' with integers STAGE, REPLICA >= 0 and "
                "STEP >= 1, e.g. '2:100' or '2.1:100'")
    parts = str(text).strip().split(":")
    where = parts[0].split(".")
    if len(parts) != 2 or len(where) > 2:
        raise ValueError(f"bad fail_at {text!r}: {expected}")
    try:
        numbers = [int(where[0]), int(parts[1])] + [int(w) for w in where[1:]]
    except ValueError:
        raise ValueError(f"bad fail_at {text!r}: {expected}") from None
    if numbers[0] < 0 or numbers[1] < 1 or (len(numbers) == 3 and numbers[2] < 0):
        raise ValueError(f"bad fail_at {text!r}: {expected}")
    return tuple(numbers)


class FailurePlan:
    """Which stages fail at which step: explicit ``fail_at`` entries, a replayed schedule
    file and per-step random draws at an hourly rate, merged.

    ``failures_at`` is what the training loop calls once per step; it also counts what
    it hands out (``counts``). ``failures_between`` and ``save`` are previews that do not
    count.
    """

    def __init__(
        self,
        num_stages: int,
        fail_at: Iterable[FailAtSpec] = (),
        rate_percent_per_hour: float = 0.0,
        step_seconds: float | None = None,
        seed: int = 0,
        schedule_file: str | Path | None = None,
        step_probability: float | None = None,
        preset: str | None = None,
        never_fail: Iterable[int] = (),
        draws: str = "logical_step",
    ):
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages must be an integer >= 1, got {num_stages!r}")
        self.num_stages = num_stages
        self.seed = int(seed)
        self.rate_percent_per_hour = float(rate_percent_per_hour)
        self.step_seconds = None if step_seconds is None else float(step_seconds)
        if self.rate_percent_per_hour > 0 and self.step_seconds is None:
            raise ValueError(
                f"rate_percent_per_hour={rate_percent_per_hour} needs step_seconds "
                "(the duration of one step) to turn the hourly rate into a per-step probability")
        # validates both values; a plan without a rate needs no step duration
        self.step_probability = step_failure_probability(
            self.rate_percent_per_hour, 1.0 if self.step_seconds is None else self.step_seconds)
        if (step_probability is not None) + (preset is not None) + (self.rate_percent_per_hour > 0) > 1:
            raise ValueError("give one of rate_percent_per_hour, step_probability and preset")
        if preset is not None:
            if preset not in RATE_PRESETS:
                raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(RATE_PRESETS)}")
            self.step_probability = RATE_PRESETS[preset][0]
        elif step_probability is not None:
            if not (math.isfinite(step_probability) and 0.0 <= step_probability < 1.0):
                raise ValueError(f"step_probability must be in [0, 1), got {step_probability!r}")
            self.step_probability = float(step_probability)
        self.preset = preset
        self.label = rate_label(self.rate_percent_per_hour, self.step_seconds,
                                None if preset else step_probability, preset)
        if draws not in FAILURE_DRAWS:
            raise ValueError(f"draws must be one of {FAILURE_DRAWS}, got {draws!r}")
        self.draws = draws
        self.never_fail = frozenset(int(s) for s in never_fail)

        # (step, stage) -> cause for the explicit sources; fail_at is filled first and so
        # wins over the schedule file, and both win over a rate draw for the same slot
        self._explicit: dict[tuple[int, int], str] = {}
        # (step, stage) -> the single replicas lost there (absent: every replica)
        self._replicas: dict[tuple[int, int], set[int]] = {}
        whole: set[tuple[int, int]] = set()
        for entry in fail_at:
            stage, step, *replica = parse_fail_at(entry) if isinstance(entry, str) else tuple(int(x) for x in entry)
            if not 0 <= stage < num_stages or step < 1 or (replica and replica[0] < 0):
                raise ValueError(
                    f"fail_at entry {entry!r} is out of range: stage must be in [0, {num_stages - 1}], "
                    "replica >= 0 and step >= 1")
            if stage in self.never_fail:
                raise ValueError(f"fail_at entry {entry!r} names stage {stage}, which never fails in this layout "
                                 f"(stages {sorted(self.never_fail)} are excluded from failures)")
            self._explicit[(step, stage)] = "fail_at"
            if replica:
                self._replicas.setdefault((step, stage), set()).add(replica[0])
            else:
                whole.add((step, stage))
        for key in whole:  # a whole-stage entry covers every replica
            self._replicas.pop(key, None)
        self.schedule_file = None if schedule_file is None else Path(schedule_file)
        #: (executed step, stage) of a schedule file written with executed-step draws
        self._executed_explicit: dict[tuple[int, int], str] = {}
        if self.schedule_file is not None:
            keyed = schedule_keyed_by(self.schedule_file)
            target = self._executed_explicit if keyed == "executed_step" else self._explicit
            for step, stage in self._load_schedule(self.schedule_file):
                if stage in self.never_fail:
                    raise ValueError(f"schedule file {str(self.schedule_file)!r} fails stage {stage} at step {step}, "
                                     f"but stages {sorted(self.never_fail)} never fail in this layout; regenerate "
                                     "it with the same layout")
                target.setdefault((step, stage), "schedule_file")

        self._counted_steps: set[int] = set()
        self._counts: Counter[str] = Counter()
        self._recorded: set[tuple[int, int]] = set()

    @classmethod
    def from_config(cls, cf, num_stages: int) -> "FailurePlan":
        """The plan a run's ``checkfree`` section describes (layout: which stages never fail)."""
        from ds_checkfree.config.layout import never_fail_stages
        return cls(num_stages, fail_at=cf.fail_at, rate_percent_per_hour=cf.failure_rate,
                   step_seconds=cf.assumed_step_seconds, seed=cf.failure_seed, schedule_file=cf.failure_schedule,
                   step_probability=cf.failure_probability, preset=cf.failure_preset,
                   never_fail=never_fail_stages(num_stages, cf.layout), draws=cf.failure_draws)

    def _load_schedule(self, path: Path) -> list[tuple[int, int]]:
        return load_schedule_file(path, self.num_stages)

    def _rate_fails(self, step: int, stage: int) -> bool:
        """One independent draw for (step, stage), seeded only by (seed, step, stage); ``step``
        is the executed step under ``draws="executed_step"``. Never-failing stages draw nothing
        (the other stages' draws do not depend on them)."""
        if self.step_probability <= 0.0 or stage in self.never_fail:
            return False
        # str seeds are hashed with SHA-512 by random.Random: stable across processes
        return random.Random(f"{self.seed}:{step}:{stage}").random() < self.step_probability

    def _compute(self, step: int, executed: int | None = None) -> list[Failure]:
        """Failures of logical ``step`` run as executed step ``executed`` (None: no step was
        redone before it, so ``executed == step``). ``fail_at`` entries follow the logical step;
        rate draws and executed-step schedule files follow the executed one when ``draws`` says so."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"step must be an integer >= 1, got {step!r}")
        executed = step if executed is None else int(executed)
        draw_at = executed if self.draws == "executed_step" else step
        out = []
        for stage in range(self.num_stages):
            cause = self._explicit.get((step, stage)) or self._executed_explicit.get((executed, stage))
            if cause is None and self._rate_fails(draw_at, stage):
                cause = "rate"
            if cause is None:
                continue
            replicas = self._replicas.get((step, stage)) if cause == "fail_at" else None
            if replicas:
                out.extend(Failure(step, stage, cause, r, executed=executed) for r in sorted(replicas))
            else:
                out.append(Failure(step, stage, cause, executed=executed))
        return out

    def failures_at(self, step: int, executed: int | None = None) -> list[Failure]:
        """The failures injected at ``step`` (sorted by stage), run as executed step ``executed``;
        counted once per step (per executed step under ``draws="executed_step"``)."""
        out = self._compute(step, executed)
        key = executed if self.draws == "executed_step" and executed is not None else step
        if key not in self._counted_steps:
            self._counted_steps.add(key)
            self._counts.update(f.cause for f in out)
        return out

    def event_fields(self, failure: Failure) -> dict:
        """The ``failure`` event's fields: the cause, the replica and executed step where set,
        and for a drawn failure the rate in both units (``rate_label``)."""
        out = {"cause": failure.cause}
        if failure.replica is not None:
            out["replica"] = failure.replica
        if failure.executed is not None:
            out["executed_step"] = failure.executed
        if failure.cause == "rate" and self.label is not None:
            out.update(per_step_probability=self.label["per_step_probability"],
                       percent_per_hour=self.label["percent_per_hour"], rate_step_seconds=self.label["step_seconds"])
        return out

    def failures_between(self, first_step: int, last_step: int) -> list[Failure]:
        """All failures for steps ``first_step..last_step`` inclusive (a preview: not counted)."""
        if first_step < 1 or last_step < first_step:
            raise ValueError(f"need 1 <= first_step <= last_step, got {first_step}..{last_step}")
        return [f for step in range(first_step, last_step + 1) for f in self._compute(step)]

    def record_process_lost(self, step: int, stage: int) -> Failure:
        """Count a real (not injected) loss detected at runtime, once per (step, stage)."""
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage {stage} out of range [0, {self.num_stages - 1}]")
        failure = Failure(int(step), int(stage), "process_lost")
        if (failure.step, failure.stage) not in self._recorded:
            self._recorded.add((failure.step, failure.stage))
            self._counts["process_lost"] += 1
        return failure

    def counts(self) -> dict[str, int]:
        """How many failures were handed out so far, per cause (every cause listed)."""
        return {cause: self._counts.get(cause, 0) for cause in CAUSES}

    def save(self, path: str | Path, num_steps: int) -> list[Failure]:
        """Write steps 1..num_steps as a JSON schedule that another plan replays exactly.

        Lets a benchmark fix the failures once and replay them for every strategy.
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        failures = self.failures_between(1, num_steps)
        data = {
            "num_stages": self.num_stages,
            "seed": self.seed,
            "rate_percent_per_hour": self.rate_percent_per_hour,
            "step_seconds": self.step_seconds,
            "rate": self.label,
            # "executed_step": entry i fails the i-th executed step (redone steps counted)
            "keyed_by": self.draws,
            "never_fail": sorted(self.never_fail),
            "num_steps": num_steps,
            "failures": [{"step": f.step, "stage": f.stage, "cause": f.cause} for f in failures
                         if f.replica is None],  # schedule files are per stage (every replica)
        }
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
        return failures


def schedule_keyed_by(path: str | Path) -> str:
    """What a schedule file's ``step`` counts: logical steps (older files) or executed steps."""
    try:
        with open(path) as f:
            keyed = json.load(f).get("keyed_by", "logical_step")
    except (OSError, ValueError, AttributeError):
        return "logical_step"  # load_schedule_file names what is wrong with the file
    if keyed not in FAILURE_DRAWS:
        raise ValueError(f"schedule file {str(path)!r} has keyed_by {keyed!r}; expected one of {FAILURE_DRAWS}")
    return keyed


def load_schedule_file(path: str | Path, num_stages: int) -> list[tuple[int, int]]:
    """(step, stage) pairs of a schedule written by ``FailurePlan.save``; ``ValueError`` names
    what is wrong with the file."""
    path = Path(path)
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"schedule file {str(path)!r} is not valid JSON (line {err.lineno} column {err.colno}: "
                         f"{err.msg}); write it with --save_failure_schedule") from None
    if not isinstance(data, dict) or not isinstance(data.get("failures", []), list):
        raise ValueError(f"schedule file {str(path)!r} must be an object with a 'failures' list, as written by "
                         "--save_failure_schedule")
    if data.get("num_stages") != num_stages:
        raise ValueError(
            f"schedule file {str(path)!r} was written for num_stages={data.get('num_stages')!r}, "
            f"but this run has num_stages={num_stages}; regenerate it for {num_stages} stages")
    out = []
    for item in data.get("failures", []):
        try:
            step, stage = int(item["step"]), int(item["stage"])
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"schedule file {str(path)!r} has an entry {item!r} without integer 'step' and "
                             "'stage'") from None
        if not 0 <= stage < num_stages or step < 1:
            raise ValueError(
                f"schedule file {str(path)!r} has failure {item!r} out of range: stage must be in "
                f"[0, {num_stages - 1}] and step >= 1")
        out.append((step, stage))
    return out
