"""The one recovery driver: lost (stage, replica) slots in, rebuilt stages or a rollback out.

Whatever lost the stages (a seeded plan wiping them in live processes, ``recovery.logical``;
a real process death after the survivors agreed and built a new engine,
``recovery.process_loss``; a user's loop, ``ds_checkfree.manager``), the same plan runs with
the same collaborators: the CheckFree rules, replica copies, the in-memory stage copies of
layout "paper", the DeepSpeed checkpoint (a lost stage's stale state, or every rank rolled
back), the redundant baseline's exact restore. Every rank calls it with the same arguments and
reaches the same verdict.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ds_checkfree.recovery.apply import RecoveryRecord, apply_plan, plan_for
from ds_checkfree.recovery.checkpoints import Loaded
from ds_checkfree.recovery.rules import UnrecoverableFailure


@dataclass
class Recovered:
    """What one recovery did: the records of rebuilt stages, or the checkpoint rolled back to."""
    records: list[RecoveryRecord] = field(default_factory=list)
    rollback: Loaded | None = None


class RecoveryDriver:
    """Applies the recovery plan for lost slots; one per run, shared by every cause of loss."""

    def __init__(self, checkpointer, stage_copies=None, redundant=None):
        """``stage_copies``: ``StageCopies`` when layout "paper" keeps them (else None);
        ``redundant``: the redundant baseline's shadow (mode "redundant", else None)."""
        self.checkpointer = checkpointer
        self.stage_copies = stage_copies
        self.redundant = redundant

    def recover(self, engine, lost: list[tuple[int, int]], step: int, why: str = "") -> Recovered:
        """Rebuild ``lost`` (stage, replica) pairs on ``engine`` before ``step`` runs. Raises
        ``UnrecoverableFailure`` (the same on every rank) when no rule and no checkpoint applies."""
        if not lost:
            return Recovered()
        stages = sorted({s for s, _ in lost})
        why = why or f"stages {stages} lost at step {step}"
        actions = plan_for(engine, lost)
        if any(a.method == "checkpoint_stage" for a in actions) and not self.checkpointer.exists():
            raise UnrecoverableFailure(f"{why}: the lost stages are restored from the checkpoint "
                                       f"(checkpoint_restore 'lost_stage'), but none exists yet in "
                                       f"{self.checkpointer.directory!r}")
        if any(a.method == "checkpoint" for a in actions):
            loaded = self.checkpointer.load_latest(engine, why=why)
            if self.redundant is not None:
                self.redundant.resync()  # shadows must mirror the reloaded state
            if self.stage_copies is not None:
                self.stage_copies.copy_step = None  # copies newer than the checkpoint: retake them
            return Recovered(rollback=loaded)
        copies = [a for a in actions if a.method == "replica"]
        records = apply_plan(engine, copies, step)
        rest = [a for a in actions if a.method != "replica"]
        if self.redundant is not None and any(a.method == "redundant" for a in rest):
            records += self.redundant.recover(rest, step)
        else:
            records += apply_plan(engine, rest, step, copies=self.stage_copies, checkpointer=self.checkpointer)
        if self.redundant is not None and copies:
            self.redundant.resync()  # the restored replica's shadow of its successor was lost too
        return Recovered(records)
