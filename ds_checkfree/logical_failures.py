"""Logical failures: a stage's state is destroyed inside a live process, then recovered.

Failures are decided by a seeded ``FailurePlan`` that every rank evaluates identically, so
all ranks agree on who is lost at a step boundary without exchanging a message. Recovery
then runs the CheckFree rules, the redundant baseline's exact restore, or a rollback to the
last DeepSpeed checkpoint where no rule applies; or stops with an error that says why.
"""
from __future__ import annotations

from dataclasses import dataclass

from .checkpoints import Loaded
from .failures import Failure, FailurePlan
from .recovery_runtime import RecoveryRecord, apply_plan, plan_for, stable_seed


@dataclass
class Handled:
    """What handling one step's failures did: records of rebuilt stages, or a rollback."""
    lost: list[int]
    records: list[RecoveryRecord]
    rollback: Loaded | None = None  # set when every rank reloaded the last checkpoint


class LogicalFailures:
    """Fires each planned failure once (a step redone after a rollback does not fail again)."""

    def __init__(self, plan: FailurePlan, checkpointer, redundant=None):
        self.plan = plan
        self.checkpointer = checkpointer
        self.redundant = redundant
        self._fired: set[tuple[int, int]] = set()

    def due(self, step: int) -> list[Failure]:
        failures = [f for f in self.plan.failures_at(step) if (f.step, f.stage) not in self._fired]
        self._fired.update((f.step, f.stage) for f in failures)
        return failures

    def handle(self, engine, step: int, failures: list[Failure], dump=None) -> Handled:
        """Destroy the lost stages (on their ranks) and recover them (every rank, same plan).
        ``dump(tag)`` is the debug hook that saves this rank's state around the recovery."""
        dump = dump or (lambda tag: None)
        lost = sorted({f.stage for f in failures})
        dump("before")
        if engine.stage_id in lost:
            engine.wipe_stage(seed=stable_seed("wipe", step, engine.stage_id, engine.global_rank))
            if self.redundant is not None:
                self.redundant.wipe(seed=stable_seed("wipe-shadow", step, engine.stage_id))
            dump("wiped")
        actions = plan_for(engine, lost)  # UnrecoverableFailure: the same verdict on every rank
        if any(a.method == "checkpoint" for a in actions):
            loaded = self.checkpointer.load_latest(engine, why=f"stages {lost} lost at step {step}")
            if self.redundant is not None:
                self.redundant.resync()  # shadows must mirror the reloaded state
            dump("rollback")
            return Handled(lost, [], rollback=loaded)
        if self.redundant is not None and any(a.method == "redundant" for a in actions):
            records = self.redundant.recover(actions, step)
        else:
            records = apply_plan(engine, actions, step)
        dump("after")
        return Handled(lost, records)

