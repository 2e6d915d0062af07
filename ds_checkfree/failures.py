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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

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


@dataclass(frozen=True, order=True)
class Failure:
    """One stage lost at the start of one step, and why it was lost.

    ``replica``: the data-parallel replica that is lost, or None for every replica of the
    stage (what rates, schedule files and ``"STAGE:STEP"`` entries mean)."""
    step: int
    stage: int
    cause: str
    replica: int | None = None

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
            self._explicit[(step, stage)] = "fail_at"
            if replica:
                self._replicas.setdefault((step, stage), set()).add(replica[0])
            else:
                whole.add((step, stage))
        for key in whole:  # a whole-stage entry covers every replica
            self._replicas.pop(key, None)
        self.schedule_file = None if schedule_file is None else Path(schedule_file)
        if self.schedule_file is not None:
            for step, stage in self._load_schedule(self.schedule_file):
                self._explicit.setdefault((step, stage), "schedule_file")

        self._counted_steps: set[int] = set()
        self._counts: Counter[str] = Counter()
        self._recorded: set[tuple[int, int]] = set()

    def _load_schedule(self, path: Path) -> list[tuple[int, int]]:
        return load_schedule_file(path, self.num_stages)

    def _rate_fails(self, step: int, stage: int) -> bool:
        """One independent draw for (step, stage), seeded only by (seed, step, stage)."""
        if self.step_probability <= 0.0:
            return False
        # str seeds are hashed with SHA-512 by random.Random: stable across processes
        return random.Random(f"{self.seed}:{step}:{stage}").random() < self.step_probability

    def _compute(self, step: int) -> list[Failure]:
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"step must be an integer >= 1, got {step!r}")
        out = []
        for stage in range(self.num_stages):
            cause = self._explicit.get((step, stage))
            if cause is None and self._rate_fails(step, stage):
                cause = "rate"
            if cause is None:
                continue
            replicas = self._replicas.get((step, stage)) if cause == "fail_at" else None
            if replicas:
                out.extend(Failure(step, stage, cause, r) for r in sorted(replicas))
            else:
                out.append(Failure(step, stage, cause))
        return out

    def failures_at(self, step: int) -> list[Failure]:
        """The failures injected at ``step`` (sorted by stage); counted once per step."""
        out = self._compute(step)
        if step not in self._counted_steps:
            self._counted_steps.add(step)
            self._counts.update(f.cause for f in out)
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
            "num_steps": num_steps,
            "failures": [{"step": f.step, "stage": f.stage, "cause": f.cause} for f in failures
                         if f.replica is None],  # schedule files are per stage (every replica)
        }
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
        return failures


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
