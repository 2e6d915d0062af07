"""``Manager``: fault tolerance for a training loop, yours or ``launch/train.py``'s.

The loop keeps its data, its logging and its step; the manager owns the engine and everything
that can replace it (torchft's ``Manager`` is the precedent). Once per step the loop asks it:

    ft = Manager.start(config, model=parts, output_dir="out")   # spares wait inside
    step = ft.start_step
    while ft.engine is not None and step <= steps:
        step = ft.begin(step)                      # logical failures; a rollback moves the step
        loss = ft.run(step, lambda engine: engine.train_batch(batches_from(step)))
        if loss is None:                           # a process died: recovered, data resumes here
            step = ft.resume_step
            continue
        ft.completed(step)
        step += 1
    ft.finish()

Logical failures (a seeded plan, ``checkfree.fail_at`` / rates) and real process deaths (under
``mpirun --with-ft ulfm``) go through the same ``RecoveryDriver``. Only evidence of a lost
peer starts a recovery: a membership round (the coordinator saw a member die or stall), the
data plane aborted by one; any other exception (an out-of-memory, a bug) is raised where it
happened and the job stops with its reason.
"""
from __future__ import annotations

import os
import sys
import time

from ds_checkfree.metrics import MetricsWriter
from ds_checkfree.recovery.checkpoints import Checkpointer
from ds_checkfree.recovery.driver import RecoveryDriver
from ds_checkfree.recovery.injection import FailurePlan
from ds_checkfree.recovery.logical import LogicalFailures
from ds_checkfree.recovery.process_loss import ProcessLossOutcome, ProcessLossRecovery, StoppedForGood, short_reason
from ds_checkfree.recovery.rules import UnrecoverableFailure
from ds_checkfree.recovery.stage_copies import StageCopies

EXIT_STOPPED = 3  # the job could not go on (no spare, no rule, the coordinator gone for good)
EXIT_FAILED = 5   # a member failed for a reason that is no lost peer (an out-of-memory, a bug)


class Manager:
    """Owns the engine of one member and rebuilds it when stages are lost."""

    def __init__(self, setup, *, world=None, joined=None, base_seed: int = 1234, output_dir: str | None = None,
                 dump=None):
        """``setup``: ``initialize.prepare``'s validated configuration; ``world``: the elastic
        runtime under the fault-tolerant launch (``elastic.world.ElasticWorld``, else None);
        ``joined``: this member is a spare taking a lost slot now (its ``Agreement``);
        ``dump(engine, step, tag)``: a debug hook around recoveries."""
        self.setup, self.cf, self.world = setup, setup.checkfree, world
        self.base_seed, self.output_dir = base_seed, output_dir
        self._dump = dump
        self.monitor = None  # the heartbeat monitor; its events are logged at step boundaries
        self.checkpoints = Checkpointer(self.cf)
        self.driver = RecoveryDriver(self.checkpoints)
        self.process_loss = ProcessLossRecovery(world, self._build_engine, self.driver, self.warn) \
            if world is not None else None
        outcome = self.process_loss.join(joined) if joined is not None else None
        if outcome is not None:
            self.engine = outcome.engine
        else:
            self.engine = self.process_loss.start() if world is not None else self._build_engine()
        self.engine_ready_at = time.time()
        e = self.engine
        self.is_writer = e.global_rank == e.grid.stage_to_global(stage_id=e.num_stages - 1, data=0)
        self.metrics = MetricsWriter(output_dir, enabled=self.is_writer, append=joined is not None)
        self.start_step = outcome.resume_step if outcome is not None else 1
        self.steps_done = self.start_step - 1
        #: where the loop's data resumes after ``run`` returned None
        self.resume_step = self.start_step
        self.redundant = None  # the redundant-computation baseline's shadow of the successor stage
        if self.cf.mode == "redundant":
            from ds_checkfree.baselines import RedundantShadow
            self.redundant = RedundantShadow(e, elastic=world is not None)
            self.driver.redundant = self.redundant
        self.plan = FailurePlan.from_config(self.cf, e.num_stages)
        copies = StageCopies(e.num_stages, self.cf.layout, self.cf.mode, self.cf.stage_copy_every)
        self.driver.stage_copies = copies if copies.active else None
        self.failures = LogicalFailures(self.plan, self.driver)
        self._timeline = None  # the last process-loss recovery, until the next step completes
        self._joined = outcome
        self.preemption = None  # SIGTERM -> hand the stage off at the next step boundary (elastic launch)
        if world is not None and self.cf.preemption_grace_s > 0:
            from ds_checkfree.elastic.preemption import PreemptionNotice
            self.preemption = PreemptionNotice(self.cf.preemption_grace_s, lambda: world.slot is not None,
                                               log=self.warn).install()
        if world is not None:
            world.set_progress(lambda: self.steps_done)  # reported to a standby coordinator after a failover

    # ------------------------------------------------------------------ starting
    @classmethod
    def start(cls, config, model="tiny", *, output_dir: str | None = None, base_seed: int = 1234,
              model_overrides: dict | None = None):
        """Validate ``config`` and ``model`` (see ``ds_checkfree.initialize``), join the job and
        build this member's engine. Under ``mpirun --with-ft ulfm`` (ranks beyond the stages are
        spares) a spare waits here until it takes a lost stage's place; a spare released at the
        end of training gets a manager whose ``engine`` is None."""
        from ds_checkfree.elastic.launch import join_elastic_job, under_fault_tolerant_mpi
        from ds_checkfree.initialize import prepare
        from ds_checkfree.models.sources import resolve_model
        source = resolve_model(model, model_overrides)
        elastic = under_fault_tolerant_mpi()
        world_size = int(os.environ["OMPI_COMM_WORLD_SIZE"]) if elastic else None
        setup = prepare(config, source, world_size=world_size, elastic=elastic)
        if not elastic:
            return cls(setup, base_seed=base_seed, output_dir=output_dir)
        world, joined, monitor = join_elastic_job(setup, output_dir=output_dir)
        if world is None:
            return _Released(setup)
        try:
            manager = cls(setup, world=world, joined=joined, base_seed=base_seed, output_dir=output_dir)
        except BaseException:
            if monitor is not None:
                monitor.stop()
            world.close()
            raise
        manager.monitor = monitor
        manager.report_start()
        return manager

    def _build_engine(self, rebuilt: bool = False):
        from ds_checkfree.initialize import build
        timeout = self.world.dp_timeout_s if self.world is not None else 120.0
        return build(self.setup, base_seed=self.base_seed, elastic=self.world is not None, dist_timeout_s=timeout,
                     rebuilt=rebuilt, kept_groups=self._kept_groups())[0]

    def _kept_groups(self):
        """(elastic, a plane that keeps idle copies of groups) where a build finds them."""
        world = self.world
        return world.kept_group if world is not None and world.plane.keeps_standby_groups else None

    def report_start(self) -> None:
        """Log how this member came in (a spare that took a lost slot reports that recovery)."""
        if self._joined is not None:
            self._report_process_loss(self._joined)
            self._joined = None

    # ------------------------------------------------------------------ the step protocol
    def begin(self, step: int) -> int:
        """Before step ``step``: the logical failures due now are applied and recovered.
        Returns the step to run (``step``, or after a rollback the checkpoint's next step:
        point the data there)."""
        failures = self.failures.due(step, self.engine)
        if not failures:
            return step
        resume = self._handle_logical_failures(step, failures)
        return step if resume is None else resume

    def run(self, step: int, fn):
        """``fn(engine)`` as (part of) step ``step``; its result, or None when a peer was lost
        during it: the job was recovered around a new engine (``self.engine``) and the data
        resumes at ``self.resume_step``."""
        try:
            return fn(self.engine)
        except Exception as err:  # noqa: BLE001 - only evidence of a lost peer is recovered
            if self.process_loss is None:
                raise
            self._raise_if_failed_elsewhere()
            reason = self.process_loss.evidence(err)
            self._raise_if_failed_elsewhere()  # declared while the coordinator was asked
            if reason is None:
                self.stop_job(err)
                raise
        self.resume_step = self._recover_process_loss(step, reason)
        return None

    def _raise_if_failed_elsewhere(self) -> None:
        from ds_checkfree.elastic.world import JobFailed
        why = self.world.failed_elsewhere()
        if why is not None:
            self.warn(f"the job stops: {why}")
            raise JobFailed(f"the job stopped: {why}") from None

    def stop_job(self, err: BaseException) -> None:
        """A member failed for a reason that is no lost peer: stop the whole job now, once,
        with the reason, rather than let the survivors take the exit for a death and re-agree.
        The error is then raised here, with its traceback; the survivors raise ``JobFailed``."""
        self.warn(f"stopping the job: {short_reason(err)} is not a lost peer (step {self.steps_done + 1})")
        self.world.declare_failed(short_reason(err))

    def completed(self, step: int, loss: float | None = None) -> None:
        """Step ``step`` finished on this member: the timeline of a recovery that preceded it is
        written and heartbeat events logged; with ``loss``, a step row too (metrics.jsonl:
        step, loss, lr, the stages' gradient norms)."""
        self.steps_done = step
        if loss is not None:
            e = self.engine
            self.metrics.write({"step": step, "loss": loss, "lr": e.effective_lr(), "time": time.time(),
                                "grad_norms": [n[1] for n in e.stage_grad_norms]})
        if self.world is not None:  # the next recovery finds its store client open (``store_clients``)
            self.world.open_next_store_client()  # and the groups it keeps formed (``standby_groups``)
            self.world.form_standby_groups(getattr(self.engine, "group_member_sets", []))
        if self._timeline is not None:
            self.metrics.event("recovery_timeline", step, None, **self._timeline, next_step_done_at=time.time(),
                               total_s=round(time.time() - self._timeline["failed_at"], 4))
            self._timeline = None
        self.log_heartbeat_events(step)

    def preempted(self, step: int, last_step: int) -> None:
        """At a step boundary: if SIGTERM came, hand this stage off and exit (never returns)."""
        if self.preemption is not None and self.preemption.requested.is_set() and step < last_step:
            self._hand_off(step)

    def finish(self, steps: int) -> None:
        """The last step is done: final events, release the spares, leave together."""
        import torch
        if self.redundant is not None:
            self.metrics.event("redundant_overhead", steps, None, stages=self.redundant.summary())
        if self.monitor is not None:
            self.log_heartbeat_events(steps)
            self.metrics.event("heartbeat_summary", steps, None, **self.monitor.summary())
            if self.world is None:
                self.monitor.stop()  # before the store's host (rank 0) goes away
        self.metrics.close()
        if self.world is not None and self.world.rank == min(self.world.stage_ranks()):
            self.world.release_spares()
        if torch.distributed.is_initialized():
            try:
                torch.distributed.barrier()
            except Exception as err:  # noqa: BLE001 - training is complete; a peer lost now changes nothing
                if self.world is None:
                    raise
                self.warn(f"a peer was lost after the last step ({type(err).__name__}); exiting")
                return
            torch.distributed.destroy_process_group()

    def save_hf(self, out_dir: str) -> str:
        """Write the model as it is now as a Hugging Face directory that
        ``AutoModelForCausalLM.from_pretrained`` loads (a model loaded from ``hf:DIR``). Every
        member calls it; each stage writes its own layers."""
        from ds_checkfree.config.checkfree import ConfigError
        src = getattr(self.setup.model, "hf_dir", None)
        if src is None:
            raise ConfigError(f"save_hf: the model {self.setup.model.name!r} was not loaded from a Hugging Face "
                              "directory, so there is no architecture to write. Fix: train from --model hf:DIR.")
        from ds_checkfree.models.hf.export import export_hf
        out = export_hf(self.engine, src, out_dir)
        self.log(f"wrote the trained model as a Hugging Face directory: {out}")
        return str(out)

    def exit(self, code: int = 0) -> None:
        """End this process: under the fault-tolerant launch without Python's finalisation (after
        a failure, groups the old engine abandoned can own gloo threads whose destructors block,
        and ULFM's MPI_Finalize can hang once peers died); elsewhere an ordinary exit."""
        self.close()
        sys.stdout.flush()
        sys.stderr.flush()
        if "OMPI_COMM_WORLD_SIZE" in os.environ:
            os._exit(code)
        sys.exit(code)

    def close(self) -> None:
        """Stop the heartbeat and leave the elastic job (idempotent)."""
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None
        if self.world is not None:
            self.world.close()
            self.world = None

    # ------------------------------------------------------------------ logical failures
    def _handle_logical_failures(self, step: int, failures) -> int | None:
        for f in failures:
            self.metrics.event("failure", step, f.stage, **self.failures.event_fields(f))
            self.log(f"step {step}: stage {f.stage}{'' if f.replica is None else f' replica {f.replica}'} lost "
                     f"({f.cause})")
        dump = (lambda tag: self._dump(self.engine, step, tag)) if self._dump else None
        try:
            handled = self.failures.handle(self.engine, step, failures, dump=dump)
        except UnrecoverableFailure as err:
            lost = sorted({f.stage for f in failures})
            self.metrics.event("unrecoverable", step, lost[0], stages=lost, reason=str(err))
            raise
        if handled.rollback is not None:
            loaded = handled.rollback
            self.metrics.event("checkpoint_load", step, None, **loaded.event(
                stages=handled.lost, steps_lost=step - loaded.resume_step, **self.checkpoints.charged(loaded.bytes)))
            self.log(f"step {step}: rolled back to the checkpoint of step {loaded.resume_step - 1} "
                     f"({loaded.seconds:.2f} s)")
            return loaded.resume_step
        for r in handled.records:
            self.metrics.event("recovery", step, r.stage, **r.as_event())
            self.log(f"step {step}: stage {r.stage} rebuilt by {r.method} from {r.sources} "
                     f"(weights {[round(w, 4) for w in r.weights]}, {r.seconds * 1e3:.1f} ms, "
                     f"{r.bytes_received / 1e6:.2f} MB)")
        return None

    # ------------------------------------------------------------------ real process losses
    def _hand_off(self, step: int) -> None:
        """Preempted (SIGTERM): publish this stage as it is after ``step`` for the member that
        takes its slot, then leave; the survivors see an ordinary death (``preemption``)."""
        from ds_checkfree.elastic.preemption import EXIT_HANDED_OFF, publish
        t0 = time.time()
        state = self.engine.training_state()
        state["handoff"] = {"sigterm_at": self.preemption.received_at, "step_done_at": t0}  # for the timeline
        nbytes = publish(self.world.shared_store(), self.world.slot, step, state)
        self.warn(f"step {step}: preempted: stage {self.world.stage} handed off ({nbytes / 1e6:.2f} MB in "
                  f"{time.time() - t0:.2f} s, {time.time() - self.preemption.received_at:.2f} s after SIGTERM); "
                  "exiting")
        self.metrics.close()
        sys.stdout.flush()
        os._exit(EXIT_HANDED_OFF)

    def _recover_process_loss(self, step: int, reason: str) -> int:
        """A stage's process died: recover in place; returns the step to continue from."""
        engine, self.engine = self.engine, None
        try:
            outcome = self.process_loss.recover(engine, step, reason, self.steps_done)
        except StoppedForGood as stop:
            self._log_stop(step, stop)
            raise stop.cause from None
        self.engine = outcome.engine
        self._report_process_loss(outcome)
        if outcome.resume_step > step:
            # the data plane broke in this rank's step ``step`` after the other stages had completed
            # it (a peer died during the step's final loss exchange): the job goes on after it, and
            # its metrics row, written by this rank if it is the writer, is lost: say so
            skipped = list(range(step, outcome.resume_step))
            self.metrics.event("steps_completed_elsewhere", step, None, steps=skipped,
                               reason="the data plane broke here after the other stages completed these steps; "
                                      "their metrics rows were not written")
            self.warn(f"steps {skipped} were completed on the other stages; no metrics row for them")
        return outcome.resume_step

    def _log_stop(self, step: int, stop: StoppedForGood) -> None:
        """The job ends here. If the metrics writer itself died, the lowest surviving stage
        rank writes the final events in its place, so metrics.jsonl says why it ended."""
        roles = self.process_loss.roles_before
        writer_dead = any(roles.get(r) == self.cf.num_stages - 1 for r in stop.dead_ranks)
        if writer_dead and self.world.rank == min((r for r in stop.survivors or [] if roles.get(r) is not None),
                                                  default=None):
            self.metrics = MetricsWriter(self.output_dir, enabled=True, append=True)
        self.log_heartbeat_events(step)
        if stop.saved is not None:
            self.metrics.event("checkpoint_save", step, stop.stage, **stop.saved)
            self.warn(f"saved this stage's state to {stop.saved['path']} before stopping")
        self.metrics.event("unrecoverable", step, stop.lost_stages[0] if stop.lost_stages else None, reason=str(stop),
                           stages=stop.lost_stages, dead_ranks=stop.dead_ranks)
        self.metrics.close()

    def _report_process_loss(self, outcome: ProcessLossOutcome) -> None:
        step, timeline, agreement = outcome.resume_step, outcome.timeline, outcome.agreement
        self._timeline = timeline
        self.log_heartbeat_events(step)
        for slot, (stage, replica) in zip(agreement.lost_stages, agreement.lost_pairs()):
            rank, one = agreement.replacements[slot], {"replica": replica} if agreement.dp > 1 else {}
            handed = any(r.method == "handoff" and r.stage == stage and r.replica in (None, replica)
                         for r in outcome.records)
            self.metrics.event("failure", step, stage, cause="preempted" if handed else "process_lost",
                               dead_ranks=agreement.dead_ranks, replaced_by_rank=rank, **one)
            self.log(f"step {step}: stage {stage}{f' replica {replica}' if one else ''} lost (process lost, "
                     f"members {agreement.dead_ranks}); member {rank} takes its place")
        for name, fields in outcome.events:
            self.metrics.event(name, step, None, **fields, **timeline)
        for r in outcome.records:
            self.metrics.event("recovery", step, r.stage, **r.as_event(), **timeline)
            self.log(f"step {step}: stage {r.stage} rebuilt by {r.method} from {r.sources} in "
                     f"{r.seconds * 1e3:.1f} ms (agreement {timeline['agreement_s']:.2f} s, data plane "
                     f"{timeline['data_plane_s']:.2f} s, engine {timeline['engine_rebuild_s']:.2f} s)")

    def log_heartbeat_events(self, step: int) -> None:
        if self.monitor is None:
            return
        for ev in self.monitor.events():
            stage = self._stage_of_rank(ev["peer"])
            self.metrics.event("heartbeat_timeout", step, stage, peer_rank=ev["peer"], reason=ev["reason"],
                               detected_at=ev["time"], role="spare" if stage is None else "stage")
            if self.world is None:
                self.warn(f"rank {ev['peer']} (stage {stage}) {ev['reason']}: under this launcher a lost process "
                          "ends the job; use mpirun --with-ft ulfm with spares to survive it")

    def _stage_of_rank(self, rank: int):
        if self.world is not None:
            return self.process_loss.roles_before.get(rank)
        return self.engine.grid.topology().get_coord(rank).pipe if self.engine is not None else None

    # ------------------------------------------------------------------ messages
    def log(self, msg: str) -> None:
        """Progress messages: printed once, by the metrics writer's rank."""
        if self.is_writer:
            print(msg, flush=True)

    def warn(self, msg: str) -> None:
        """Fault-path messages: printed by every rank (to stderr), each naming itself."""
        if self.world is not None:
            who, stage = f"rank {self.world.rank}", self.world.stage
        else:
            e = getattr(self, "engine", None)
            who, stage = f"rank {e.global_rank if e else '?'}", e.stage_id if e else None
        print(f"[{who} stage {stage}] {msg}", file=sys.stderr, flush=True)


class _Released:
    """A spare that was never needed: training finished without it."""
    engine = None
    start_step = resume_step = 1

    def __init__(self, setup):
        self.setup = setup

    def finish(self, steps: int = 0) -> None:
        pass

    def close(self) -> None:
        pass

    def exit(self, code: int = 0) -> None:
        Manager.exit(self, code)
