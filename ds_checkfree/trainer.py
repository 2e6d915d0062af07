"""The training loop of ``launch/train.py``: one loop handing off to named collaborators.

``LogicalFailures`` destroys and recovers stages inside live processes, ``Checkpointer``
saves and reloads DeepSpeed checkpoints, ``ProcessLossRecovery`` survives a real process
death (the MPI fault-tolerant launch), ``MetricsWriter`` writes metrics.jsonl. The trainer
owns the engine, the data and the order of things within a step.
"""
from __future__ import annotations

import os
import sys
import time

import torch

from ds_checkfree.recovery.checkpoints import Checkpointer
from ds_checkfree.data import build_data
from ds_checkfree.debug_dump import dump_stage
from ds_checkfree.recovery.injection import FailurePlan
from ds_checkfree.initialize import build
from ds_checkfree.recovery.driver import RecoveryDriver
from ds_checkfree.recovery.logical import LogicalFailures
from ds_checkfree.metrics import MetricsWriter, write_run_json
from ds_checkfree.elastic.preemption import EXIT_HANDED_OFF, PreemptionNotice, publish
from ds_checkfree.recovery.process_loss import DATA_PLANE_ERRORS, ProcessLossOutcome, ProcessLossRecovery, StoppedForGood
from ds_checkfree.recovery.rules import UnrecoverableFailure
from ds_checkfree.run_info import announcement, fmt_eta, run_info
from ds_checkfree.recovery.stage_copies import StageCopies


class Trainer:
    """Owns the engine, the data and the metrics writer for one run."""

    def __init__(self, options, setup, world=None, joined=None):
        """``setup``: the validated configuration (``initialize.prepare``); ``world``: the
        MPI fault-tolerant launch (``ds_checkfree.elastic.world``); ``joined``: this process is a
        spare that takes a lost stage's place now (the ``Agreement`` that gave it one)."""
        self.options, self.setup, self.cf, self.world = options, setup, setup.checkfree, world
        self.monitor = None
        torch.manual_seed(options.seed)
        self.checkpoints = Checkpointer(self.cf)
        #: the one recovery driver, shared by logical failures and real process losses
        self.driver = RecoveryDriver(self.checkpoints)
        self.process_loss = ProcessLossRecovery(world, self._build_engine, self.driver, self.warn) \
            if world is not None else None
        outcome = self.process_loss.join(joined) if joined is not None else None
        if outcome is not None:
            self.engine = outcome.engine
        else:
            self.engine = self.process_loss.start() if world is not None else self._build_engine()
        self._engine_ready_at = time.time()
        e = self.engine
        self.is_writer = e.global_rank == e.grid.stage_to_global(stage_id=e.num_stages - 1, data=0)
        self.metrics = MetricsWriter(options.output_dir, enabled=self.is_writer, append=joined is not None)
        self.start_step = outcome.resume_step if outcome is not None else 1
        self.steps_done = self.start_step - 1
        self.seq_len = options.seq_len or setup.model.max_seq_len
        self.data = build_data(options.data, self.seq_len, e.train_micro_batch_size_per_gpu(), seed=options.seed,
                               dp_rank=e.grid.get_data_parallel_id(), dp_size=e.grid.get_data_parallel_world_size(),
                               max_val_batches=options.eval_batches)
        if self.data.tokenizer.vocab_size > setup.model.vocab_size:
            raise ValueError(f"model vocab_size {setup.model.vocab_size} is smaller than the tokenizer's "
                             f"{self.data.tokenizer.vocab_size}")
        self.redundant = None  # the redundant-computation baseline's shadow of the successor stage
        if self.cf.mode == "redundant":
            from ds_checkfree.baselines import RedundantShadow
            self.redundant = RedundantShadow(e, elastic=world is not None)
            self.driver.redundant = self.redundant
        plan = FailurePlan.from_config(self.cf, e.num_stages)
        if options.save_failure_schedule and e.global_rank == 0:
            plan.save(options.save_failure_schedule, options.steps)
        copies = StageCopies(e.num_stages, self.cf.layout, self.cf.mode, self.cf.stage_copy_every)
        self.driver.stage_copies = copies if copies.active else None
        self.failures = LogicalFailures(plan, self.driver)
        self.tokens_per_step = e.train_batch_size() * self.seq_len
        self._timeline = None  # the last process-loss recovery, until the next step completes
        if self.is_writer and options.output_dir and joined is None:
            write_run_json(options.output_dir, run_info(e, setup, options, self.data, self.seq_len))
        if outcome is not None:
            self._report_process_loss(outcome)
        self.preemption = None  # SIGTERM -> hand the stage off at the next step boundary (elastic launch)
        if world is not None and self.cf.preemption_grace_s > 0:
            self.preemption = PreemptionNotice(self.cf.preemption_grace_s, lambda: world.slot is not None,
                                               log=self.warn).install()

    def _build_engine(self):
        timeout = self.world.dp_timeout_s if self.world is not None else 120.0
        return build(self.setup, base_seed=1234 + self.options.seed,
                          elastic=self.world is not None, dist_timeout_s=timeout)[0]

    # ------------------------------------------------------------------ the loop
    def run(self, monitor=None) -> int:
        """Train to ``options.steps``; ``monitor``: the heartbeat monitor, read at step boundaries."""
        self.monitor = monitor
        self._announce()
        step, start = self._first_step(), time.perf_counter()
        while step <= self.options.steps:
            failures = self.failures.due(step, self.engine)
            if failures:
                resume = self._handle_logical_failures(step, failures)
                if resume is not None:
                    step = self._restart_data(resume)
                    continue
            t0 = time.perf_counter()
            loss, broken = self._data_plane(lambda: float(self.engine.train_batch()))
            if broken is not None:  # outside any except block: the traceback (and engine) is released
                step = self._recover_process_loss(step, broken)
                continue
            self._record_step(step, loss, time.perf_counter() - t0, time.perf_counter() - start)
            _, broken = self._data_plane(lambda: self._after_step(step))
            if broken is not None:  # lost after the step completed: nothing to redo
                self.warn(f"step {step}: the failure interrupted the checkpoint/validation after the step")
                step = self._recover_process_loss(step + 1, broken)
                continue
            if self.preemption is not None and self.preemption.requested.is_set() and step < self.options.steps:
                self._hand_off(step)
            step += 1
        self.log(f"done: {self.options.steps} steps in {time.perf_counter() - start:.1f} s")
        self._finish()
        return 0

    def _first_step(self) -> int:
        """Where training starts (a restarted job: after its checkpoint); the run_start event."""
        step = self.start_step
        if self.options.resume_from and step == 1:
            loaded = self.checkpoints.load_latest(self.engine, self.options.resume_from)
            self.metrics.event("checkpoint_load", loaded.resume_step, None, **loaded.event(restart=True))
            self.log(f"resumed from the checkpoint of step {loaded.resume_step - 1} in {self.options.resume_from} "
                     f"({loaded.seconds:.2f} s)")
            step = loaded.resume_step
        started = self.options.process_started_at
        self.metrics.event("run_start", step, None, process_started_at=started, engine_ready_at=self._engine_ready_at,
                           startup_s=round(self._engine_ready_at - started, 4) if started else None)
        self.steps_done = step - 1
        if self.checkpoints.every and step == 1:
            self.metrics.event("checkpoint_save", 0, None, **self.checkpoints.save(self.engine, 0))
        return self._restart_data(step)

    def _restart_data(self, step: int) -> int:
        """Point the engine's data at ``step`` (after a start, a rollback or a rebuilt engine)."""
        self.engine.set_dataiterator(self.data.train.iterator((step - 1) * self.engine.micro_batches))
        return step

    def _after_step(self, step: int) -> None:
        """A completed step's periodic work: the baseline's checkpoint, validation."""
        if self.checkpoints.due(step):
            self.metrics.event("checkpoint_save", step, None, **self.checkpoints.save(self.engine, step))
            self._dump(step, "checkpoint")
        if (self.options.eval_every and step % self.options.eval_every == 0) or step == self.options.steps:
            val = float(self.engine.eval_batch(iter(self.data.val), num_micro_batches=len(self.data.val)))
            self.metrics.validation(step, val)
            self.log(f"step {step}: validation loss {val:.4f}")

    def _data_plane(self, fn):
        """Run a collective piece of training; under the elastic launch a broken data plane
        (a peer's process died) is returned as a reason instead of raised."""
        try:
            return fn(), None
        except Exception as err:  # noqa: BLE001 - only the elastic launch can survive it
            if self.world is None or not isinstance(err, DATA_PLANE_ERRORS):
                raise
            return None, f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"

    # ------------------------------------------------------------------ failures
    def _handle_logical_failures(self, step: int, failures) -> int | None:
        """Returns the step to resume from after a rollback, else None."""
        for f in failures:
            self.metrics.event("failure", step, f.stage, **self.failures.event_fields(f))
            self.log(f"step {step}: stage {f.stage}{'' if f.replica is None else f' replica {f.replica}'} lost ({f.cause})")
        try:
            handled = self.failures.handle(self.engine, step, failures, dump=lambda tag: self._dump(step, tag))
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

    def _hand_off(self, step: int) -> None:
        """Preempted (SIGTERM): publish this stage as it is after ``step`` for the member that
        takes its slot, then leave; the survivors see an ordinary death (``preemption``)."""
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
        return self._restart_data(outcome.resume_step)

    def _log_stop(self, step: int, stop: StoppedForGood) -> None:
        """The job ends here. If the metrics writer itself died, the lowest surviving stage
        rank writes the final events in its place, so metrics.jsonl says why it ended."""
        roles = self.process_loss.roles_before
        writer_dead = any(roles.get(r) == self.cf.num_stages - 1 for r in stop.dead_ranks)
        if writer_dead and self.world.rank == min((r for r in stop.survivors or [] if roles.get(r) is not None),
                                                  default=None):
            self.metrics = MetricsWriter(self.options.output_dir, enabled=True, append=True)
        self._log_heartbeat_events(step)
        if stop.saved is not None:
            self.metrics.event("checkpoint_save", step, stop.stage, **stop.saved)
            self.warn(f"saved this stage's state to {stop.saved['path']} before stopping")
        self.metrics.event("unrecoverable", step, stop.lost_stages[0] if stop.lost_stages else None, reason=str(stop),
                           stages=stop.lost_stages, dead_ranks=stop.dead_ranks)
        self.metrics.close()

    def _report_process_loss(self, outcome: ProcessLossOutcome) -> None:
        step, timeline, agreement = outcome.resume_step, outcome.timeline, outcome.agreement
        self._timeline = timeline
        self._log_heartbeat_events(step)
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

    def _log_heartbeat_events(self, step: int) -> None:
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

    # ------------------------------------------------------------------ reporting
    def _announce(self) -> None:
        for line in announcement(self.engine, self.setup, self.options.steps, self.tokens_per_step):
            self.log(line)

    def _record_step(self, step: int, loss: float, dt: float, elapsed: float) -> None:
        e = self.engine
        redundant = self.redundant.after_step() if self.redundant is not None else None
        self.steps_done = step
        if self._timeline is not None:
            self.metrics.event("recovery_timeline", step, None, **self._timeline, next_step_done_at=time.time(),
                               total_s=round(time.time() - self._timeline["failed_at"], 4))
            self._timeline = None
        self._log_heartbeat_events(step)
        extra = {"redundant_overhead": redundant} if redundant is not None else {}
        self.metrics.step(step, loss, e.effective_lr(), round(dt, 6), round(self.tokens_per_step / dt, 2),
                          [n[1] for n in e.stage_grad_norms] if self.cf.grad_norm == "post_clip"
                          else [n[0] for n in e.stage_grad_norms],
                          grad_norms_pre_clip=[n[0] for n in e.stage_grad_norms], **extra)
        done = step - self.start_step + 1
        eta = elapsed / max(done, 1) * (self.options.steps - step)
        self.log(f"step {step}/{self.options.steps} loss {loss:.4f} lr {e.effective_lr():.2e} "
                 f"{self.tokens_per_step / dt:,.0f} tok/s {dt:.2f} s/step ETA {fmt_eta(eta)}")

    def _dump(self, step: int, tag: str) -> None:
        dump_stage(self.options.dump_recovery_dir, self.engine, step, tag, self.redundant)

    def log(self, msg: str) -> None:
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

    def _finish(self) -> None:
        """Final events, then leave together and tear the process group down before interpreter
        exit (gloo threads still alive at exit can abort the process)."""
        steps = self.options.steps
        if self.redundant is not None:
            self.metrics.event("redundant_overhead", steps, None, stages=self.redundant.summary())
        if self.monitor is not None:
            self._log_heartbeat_events(steps)
            self.metrics.event("heartbeat_summary", steps, None, **self.monitor.summary())
            if self.world is None:
                self.monitor.stop()  # before the store's host (rank 0) goes away
        self.metrics.close()
        if self.world is not None and self.world.rank == min(self.world.stage_ranks()):
            self.world.release_spares()
        if torch.distributed.is_initialized():
            _, broken = self._data_plane(torch.distributed.barrier)
            if broken is not None:  # training is complete; a peer lost now changes nothing
                self.warn(f"a peer was lost after the last step ({broken}); exiting")
                return
            torch.distributed.destroy_process_group()
