"""Logical failures: a stage's state is destroyed inside a live process, then recovered.

Failures are decided by a seeded ``FailurePlan`` that every rank evaluates identically, so
all ranks agree on who is lost at a step boundary without exchanging a message. Recovery
then goes through the one ``RecoveryDriver`` (the CheckFree rules, the redundant baseline's
exact restore, or a rollback to the last DeepSpeed checkpoint where no rule applies; or an
error that says why).
"""
from __future__ import annotations

from dataclasses import dataclass

from ds_checkfree.recovery.apply import RecoveryRecord, stable_seed
from ds_checkfree.recovery.checkpoints import Loaded
from ds_checkfree.recovery.driver import RecoveryDriver
from ds_checkfree.recovery.injection import Failure, FailurePlan


@dataclass
class Handled:
    """What handling one step's failures did: records of rebuilt stages, or a rollback."""
    lost: list[int]
    records: list[RecoveryRecord]
    rollback: Loaded | None = None  # set when every rank reloaded the last checkpoint
    #: (stage, data-parallel replica) pairs that were lost
    lost_replicas: list[tuple[int, int]] | None = None


class LogicalFailures:
    """Fires each planned failure once per logical step (a step redone after a rollback does
    not fail again), except rate draws under ``failure_draws: "executed_step"``, which are
    drawn afresh for every executed step, redone ones included. Under the paper's layout it
    also keeps the first/last block stage's in-memory copies fresh (the driver's ``StageCopies``)."""

    def __init__(self, plan: FailurePlan, driver: RecoveryDriver):
        self.plan = plan
        self.driver = driver
        self.redundant = driver.redundant
        self.stage_copies = driver.stage_copies
        self._fired: set[tuple[int, int, int | None]] = set()
        #: loop iterations so far (every rank counts alike): the key of executed-step draws
        self.executed = 0

    def due(self, step: int, engine=None) -> list[Failure]:
        """The failures that hit ``step`` now; called once per loop iteration, before the step.
        With ``engine``, a stage copy due after step - 1 is taken first (before any wipe)."""
        if engine is not None and self.stage_copies is not None:
            self.stage_copies.refresh(engine, step - 1)
        self.executed += 1
        out = []
        for f in self.plan.failures_at(step, executed=self.executed):
            if f.cause == "rate" and self.plan.draws == "executed_step":
                out.append(f)
            elif (f.step, f.stage, f.replica) not in self._fired:
                self._fired.add((f.step, f.stage, f.replica))
                out.append(f)
        return out

    def event_fields(self, failure: Failure) -> dict:
        """The ``failure`` event's fields (cause, replica, executed step, the rate in both units)."""
        return self.plan.event_fields(failure)

    def handle(self, engine, step: int, failures: list[Failure], dump=None) -> Handled:
        """Destroy the lost stages (on their ranks) and recover them (every rank, same plan).
        ``dump(tag)`` is the debug hook that saves this rank's state around the recovery."""
        dump = dump or (lambda tag: None)
        lost = sorted({f.stage for f in failures})
        dp_size = engine.grid.get_data_parallel_world_size()
        pairs = sorted({(f.stage, r) for f in failures for r in (range(dp_size) if f.replica is None else [f.replica])})
        dump("before")
        if (engine.stage_id, engine.grid.get_data_parallel_id()) in pairs:
            engine.wipe_stage(seed=stable_seed("wipe", step, engine.stage_id, engine.global_rank))
            if self.redundant is not None:
                self.redundant.wipe(seed=stable_seed("wipe-shadow", step, engine.stage_id))
            dump("wiped")
        # UnrecoverableFailure: the same verdict on every rank
        done = self.driver.recover(engine, pairs, step, why=f"stages {lost} lost at step {step}")
        if done.rollback is not None:
            dump("rollback")
            return Handled(lost, [], rollback=done.rollback, lost_replicas=pairs)
        dump("after")
        return Handled(lost, done.records, lost_replicas=pairs)

