"""Recovery from a real process death (``mpirun --with-ft ulfm``): agree, rebuild, re-materialise.

The survivors keep their stage in memory, drop the old engine so its sockets close (peers
blocked on this rank then fail at once), agree through the coordinator on who is gone
(``ds_checkfree.elastic.world``), form a new data plane, build a new engine around the kept state
and let the CheckFree / CheckFree+ rules re-materialise the lost stages on the spares that
took their place. The result is one ``ProcessLossOutcome``; the trainer only logs it and
carries on from ``resume_step`` (in the spirit of torchft's Manager owning quorum and heal).
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

from ds_checkfree.pipe.ds_private import release_engine
from ds_checkfree.elastic.standby_groups import rebuild_line
from ds_checkfree.elastic.world import Agreement, NoSpareLeft
from ds_checkfree.elastic.membership.client import CoordinatorLost
from ds_checkfree.recovery.apply import RecoveryRecord, share_record
from ds_checkfree.recovery.driver import RecoveryDriver
from ds_checkfree.recovery.rules import UnrecoverableFailure


#: what a lost peer raises while a data plane forms or an engine is built over it (torch's
#: DistError and gloo's errors are RuntimeErrors, ``DataPlaneInterrupted`` too); anything
#: else (an ImportError, a TypeError) is a bug that no new generation fixes: it propagates
DATA_PLANE_ERRORS = (RuntimeError, OSError)
def short_reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"


#: consecutive re-forms without a completed one before the error propagates: each needs a
#: new death (or a stalled peer's eviction), so more than this is a fault that repeats
MAX_REFORMS = 8


@dataclass
class ProcessLossOutcome:
    """Everything a recovery produced; identical on every member but ``engine``."""
    engine: object
    agreement: Agreement
    records: list[RecoveryRecord]
    timeline: dict
    #: the step to continue from: the interrupted one, or after the checkpoint rolled back to
    resume_step: int
    #: extra metrics events, (name, fields), logged with the timeline (a rollback's load)
    events: list[tuple[str, dict]] = field(default_factory=list)


class StoppedForGood(RuntimeError):
    """No recovery is possible. ``cause``: the ``NoSpareLeft`` / ``UnrecoverableFailure``;
    ``lost_stages`` / ``dead_ranks`` / ``survivors`` (world ranks) when known; ``saved``: the ``checkpoint_save`` fields of
    this rank's stage state written before stopping (None: nothing written)."""

    def __init__(self, cause: Exception, lost_stages: list[int], dead_ranks: list[int], stage=None,
                 saved: dict | None = None, survivors: list[int] | None = None):
        super().__init__(str(cause))
        self.cause, self.lost_stages, self.dead_ranks = cause, lost_stages, dead_ranks
        self.stage, self.saved, self.survivors = stage, saved, survivors


def freeze_startup_objects() -> None:
    """Move everything alive before the first engine (imported modules: ~200k objects) out of
    the collector's reach: ``release_engine``'s ``gc.collect`` and object scan then only walk
    what was built since (engines, data), ~0.15 s less on each side of every recovery. Stage
    ranks call it before their first engine (``start``), spares before they wait."""
    gc.collect()
    gc.freeze()


class ProcessLossRecovery:
    """Owns the elastic world's side of a run: the first data plane, and every recovery."""

    def __init__(self, world, build_engine, driver: RecoveryDriver, warn):
        """``build_engine(rebuilt=False)`` returns a new engine over the current data plane
        (``rebuilt``: its parameters are all replaced right after, by kept or re-materialised
        stages); ``driver`` re-materialises the lost stages on it (the same driver logical
        failures use)."""
        self.world = world
        self.build_engine = build_engine
        self.driver = driver
        self.checkpointer = driver.checkpointer
        self.warn = warn
        #: world rank -> stage before the last agreement (names the dead in heartbeat events)
        self.roles_before: dict = dict(world.roles)
        self._close_s: dict = {}  # the last recovery's snapshot and socket-close times
        self._without_progress = (-1, 0)  # (steps done, recoveries since a step last completed)

    def evidence(self, err: BaseException) -> str | None:
        """The reason to recover from ``err``, or None when it is no evidence of a lost peer.

        Evidence: the data plane aborted or interrupted by a membership round, or a
        communication error that the coordinator confirms by opening a round within the
        heartbeat timeout (a death closes the member's connection at once; a stall is declared
        after ``heartbeat_timeout_s``). An out-of-memory, a bug, anything else is not: it must
        surface once, where it happened, not as up to ``MAX_REFORMS`` re-agreements."""
        import torch

        from ds_checkfree.elastic.data_plane import DataPlaneAborted
        from ds_checkfree.elastic.member_plane import DataPlaneInterrupted
        if isinstance(err, (DataPlaneAborted, DataPlaneInterrupted)):
            return short_reason(err)
        if isinstance(err, torch.OutOfMemoryError) or not isinstance(err, DATA_PLANE_ERRORS):
            return None
        cf = self.world.cf
        confirm_s = (cf.heartbeat_timeout_s + 4 * cf.heartbeat_interval_s) if cf is not None else 15.0
        if self.world.wait_for_round(confirm_s):
            return short_reason(err)
        self.warn(f"{short_reason(err)}: no member was lost (no membership round within {confirm_s:.1f} s): "
                  "not recovering")
        return None

    def start(self):
        """The launch-time data plane and engine of a stage holder. A member lost before the
        first step only changes who builds which stage from the seed: agree and form again."""
        freeze_startup_objects()
        for attempt in range(MAX_REFORMS + 1):
            try:
                self.world.init_data_plane()
                return self.build_engine()
            except DATA_PLANE_ERRORS as err:  # a peer lost while the job was forming
                if attempt == MAX_REFORMS or self.evidence(err) is None:
                    raise
                self.warn(f"the data plane broke while forming ({_short(err)}); agreeing on the members again")
                self.world.tear_down_data_plane()
                self._agree(steps_done=0, has_state=False, kept=None, step=1, stage_before=self.world.stage)

    def recover(self, engine, step: int, reason: str, steps_done: int) -> ProcessLossOutcome:
        """The data plane broke at ``step``; raises ``StoppedForGood`` when nothing can take
        the lost stages' place (after saving this rank's stage, if a directory is configured)."""
        failed_at = time.time()
        self.warn(f"step {step}: data plane error ({reason}); agreeing on the survivors")
        last, count = self._without_progress
        self._without_progress = (steps_done, count + 1 if steps_done == last else 1)
        if self._without_progress[1] > MAX_REFORMS:  # the same step keeps failing: not a lost peer
            raise RuntimeError(f"step {step} failed {MAX_REFORMS + 1} times in a row on a rebuilt data plane "
                               f"(last: {reason}); a fault that repeats is not a lost process: stopping")
        kept = engine.training_state()
        t_kept = time.time()
        release_engine(engine)
        del engine
        self.world.tear_down_data_plane()
        self._close_s = {"snapshot_s": round(t_kept - failed_at, 4), "close_s": round(time.time() - t_kept, 4)}
        stage_before = self.world.stage
        agreement = self._agree(steps_done, True, kept, step, stage_before)
        return self._rebuild_until_formed(agreement, kept, steps_done, failed_at, reason, step, stage_before)

    def join(self, agreement: Agreement) -> ProcessLossOutcome:
        """A spare or a joining process takes a lost stage's place (it has no state to keep)."""
        self.roles_before = dict(agreement.roles_before)
        self._close_s = {}
        return self._rebuild_until_formed(agreement, None, 0, agreement.revoked_at, "process lost", 1, None)

    def _agree(self, steps_done: int, has_state: bool, kept, step: int, stage_before) -> Agreement:
        self.roles_before = dict(self.world.roles)
        try:
            agreement = self.world.agree(steps_done=steps_done, has_state=has_state)
        except (NoSpareLeft, CoordinatorLost) as stop:
            saved = self.checkpointer.save_stopped_state(kept, step, stage_before, steps_done) \
                if kept is not None else None
            lost, dead, survivors = (stop.lost_stages, stop.dead_ranks, stop.survivors) \
                if isinstance(stop, NoSpareLeft) else ([], [], None)
            raise StoppedForGood(stop, lost, dead, stage_before, saved, survivors=survivors) from None
        if agreement.dead_ranks or agreement.lost_stages:
            self.warn(f"generation {agreement.generation}: members gone {agreement.dead_ranks}"
                      f"{f' (evicted {agreement.evicted})' if agreement.evicted else ''}, lost stages "
                      f"{agreement.lost_stages}, replacements {agreement.replacements}, redo from step "
                      f"{agreement.resume_step}")
        return agreement

    def _rebuild_until_formed(self, agreement: Agreement, kept, steps_done: int, failed_at: float, reason: str,
                              step: int, stage_before) -> ProcessLossOutcome:
        """``_rebuild``, again with the next plan when another member is lost meanwhile."""
        for attempt in range(MAX_REFORMS + 1):
            try:
                return self._rebuild(agreement, kept, failed_at, reason)
            except (StoppedForGood, UnrecoverableFailure):
                raise
            except DATA_PLANE_ERRORS as err:  # a second failure during the rebuild
                if attempt == MAX_REFORMS or self.evidence(err) is None:
                    raise
                self.warn(f"generation {agreement.generation}: rebuild interrupted ({_short(err)}); agreeing again")
                self.world.tear_down_data_plane()
                agreement = self._agree(steps_done, kept is not None, kept, step, stage_before)

    def _rebuild(self, agreement: Agreement, kept: dict | None, failed_at: float, reason: str) -> ProcessLossOutcome:
        """New data plane and engine around the kept state, then the CheckFree rules."""
        t0 = time.time()
        self.world.init_data_plane()
        t_plane = time.time()
        engine = self.build_engine(rebuilt=True)
        built = getattr(engine, "build_seconds", {})
        self.warn(rebuild_line(agreement.generation, self.world.slot, built.get("groups_kept", 0),
                               getattr(engine, "formed_member_sets", []), built.get("groups_s", 0.0)))
        try:
            return self._rematerialise(engine, agreement, kept, failed_at, reason, t0, t_plane)
        except Exception:
            release_engine(engine)
            raise

    def _rematerialise(self, engine, agreement: Agreement, kept, failed_at: float, reason: str, t0: float,
                       t_plane: float) -> ProcessLossOutcome:
        t_loaded_from = time.time()
        if kept is not None:
            engine.load_training_state(kept)
        t_built = time.time()
        events, resume_step = [], agreement.resume_step
        try:
            handed, lost = self._take_handoffs(engine, agreement.lost_pairs(), resume_step - 1)
            # same verdict on every rank
            done = self.driver.recover(engine, lost, resume_step, why=f"stages {agreement.lost_stages} lost")
            records = handed + done.records
            if done.rollback is not None:
                loaded = done.rollback
                events.append(("checkpoint_load", loaded.event(stages=agreement.lost_stages,
                                                               steps_lost=resume_step - loaded.resume_step)))
                self.warn(f"rolled back to the checkpoint of step {loaded.resume_step - 1} ({loaded.seconds:.2f} s)")
                resume_step = loaded.resume_step
        except UnrecoverableFailure as err:
            raise StoppedForGood(err, agreement.lost_stages, agreement.dead_ranks) from None
        t_remat = time.time()
        timeline = {"failed_at": failed_at, "error": reason, "revoked_at": agreement.revoked_at,
                    "agreed_at": agreement.agreed_at, "data_plane_at": t_plane, "engine_at": t_built,
                    "rematerialised_at": t_remat,
                    "agreement_s": round(agreement.agreed_at - agreement.revoked_at, 4),
                    "data_plane_s": round(t_plane - t0, 4), "engine_rebuild_s": round(t_built - t_plane, 4),
                    **{f"rebuild_{k}": v for k, v in getattr(engine, "build_seconds", {}).items()},
                    "rebuild_state_load_s": round(t_built - t_loaded_from, 4),
                    "rematerialise_s": round(t_remat - t_built, 4), "resume_step": resume_step, **self._close_s}
        return ProcessLossOutcome(engine, agreement, records, timeline, resume_step, events)

    def _take_handoffs(self, engine, lost: list[tuple[int, int]], after_step: int):
        """Lost slots whose member handed its stage off after ``after_step`` (a preemption
        notice, ``ds_checkfree.elastic.preemption``) are loaded exactly by their new holder, before any
        rule runs (a neighbour rebuilt next reads the handed-off state). Every member asks the
        store the same question and gets the same answer: the hand-off was written before the
        exit that opened this round. Returns (their records, the lost slots left for the rules)."""
        if not lost:
            return [], []
        from ds_checkfree.elastic import preemption
        grid, dp = engine.grid, engine.grid.get_data_parallel_world_size()
        handed = self.world.with_shared_store(
            lambda st: [p for p in lost if preemption.available(st, p[0] * dp + p[1], after_step)])
        store = self.world.shared_store()  # the client that answered
        records = []
        for stage, replica in handed:
            target = grid.stage_to_global(stage_id=stage, data=replica)
            record = None
            if engine.global_rank == target:
                start = time.perf_counter()
                state, nbytes = preemption.take(store, stage * dp + replica, after_step, map_location=engine.device)
                when = state.pop("handoff", {})  # the leaver's clock: SIGTERM, and its step's end
                engine.load_training_state(state)
                record = RecoveryRecord(stage=stage, method="handoff", sources=[stage], weights=[1.0],
                                        seconds=time.perf_counter() - start, bytes_received=nbytes,
                                        lr_scale=engine.lr_scale, replica=replica if dp > 1 else None,
                                        source_replica=replica if dp > 1 else None,
                                        extra={"handoff_after_step": after_step, **when})
            records.append(share_record(record, target))
        return records, [p for p in lost if p not in handed]


_short = short_reason
