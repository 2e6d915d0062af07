"""The training loop of ``launch/train.py``: steps, validation, failures, recovery, metrics.

Failures are decided by a seeded ``FailurePlan`` that every rank evaluates identically, so
all ranks agree on who is lost at a step boundary without exchanging a message. Recovery
then runs the CheckFree rules (or rolls back to a DeepSpeed checkpoint where they cannot
apply, or stops with an error that says why).
"""
from __future__ import annotations

import copy
import os
import platform
import sys
import time
import warnings

import torch

from .data import build_data
from .failures import Failure, FailurePlan
from .initialize import initialize
from .metrics import MetricsWriter, write_run_json
from .recovery import UnrecoverableFailure
from .recovery_runtime import apply_plan, plan_for, wipe_stage


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Trainer:
    """Owns the engine, the data and the metrics writer for one run."""

    def __init__(self, args, ds_config: dict, world=None, heartbeat=None, joined=None):
        """``world``/``heartbeat``: the MPI fault-tolerant launch (``ds_checkfree.elastic``);
        ``joined``: this process is a spare that takes a lost stage's place now."""
        self.args = args
        self.ds_config = ds_config
        self.world = world
        self.heartbeat = heartbeat
        self.timeline = None
        self._pending_events: list[tuple[str, dict]] = []  # raised before the metrics writer exists
        torch.manual_seed(args.seed)
        if world is not None and joined is None:
            world.init_data_plane()
        self.engine = None
        self.engine, self.setup = self._build_engine() if joined is None else (None, None)
        if joined is not None:
            self.setup = self._rebuild(joined, failed_at=joined.revoked_at, reason="process lost")
        e = self.engine
        self._engine_ready_at = time.time()
        self.cf = self.setup.checkfree
        self.writer_rank = e.grid.stage_to_global(stage_id=e.num_stages - 1, data=0)
        self.is_writer = e.global_rank == self.writer_rank
        self.metrics = MetricsWriter(args.output_dir, enabled=self.is_writer, append=joined is not None)
        self.start_step = joined.resume_step if joined is not None else 1
        seq_len = args.seq_len or self.setup.model.max_seq_len
        self.seq_len = seq_len
        self.data = build_data(args.data, seq_len, e.train_micro_batch_size_per_gpu(), seed=args.seed,
                               dp_rank=e.grid.get_data_parallel_id(), dp_size=e.grid.get_data_parallel_world_size(),
                               max_val_batches=args.eval_batches)
        if self.data.tokenizer.vocab_size > self.setup.model.vocab_size:
            raise ValueError(f"model vocab_size {self.setup.model.vocab_size} is smaller than the tokenizer's "
                             f"{self.data.tokenizer.vocab_size}")
        self.plan = FailurePlan(e.num_stages, fail_at=self.cf.fail_at, rate_percent_per_hour=self.cf.failure_rate,
                                step_seconds=self.cf.assumed_step_seconds, seed=self.cf.failure_seed,
                                schedule_file=self.cf.failure_schedule)
        if args.save_failure_schedule and e.global_rank == 0:
            self.plan.save(args.save_failure_schedule, args.steps)
        self.tokens_per_step = e.train_batch_size() * seq_len
        self.checkpoint_dir = self.cf.checkpoint_dir or self.cf.fallback_checkpoint_dir
        self.last_checkpoint_step = None
        self._fired: set[tuple[int, int]] = set()
        self.redundant = None  # the redundant-computation baseline's shadow of the successor stage
        if self.cf.mode == "redundant":
            from .baselines import RedundantShadow
            self.redundant = RedundantShadow(e, elastic=world is not None)
        if world is None and heartbeat is None and not getattr(args, "no_heartbeat", False):
            self.heartbeat = self._store_heartbeat()
        if self.is_writer and args.output_dir and joined is None:
            write_run_json(args.output_dir, self._run_info())
        if joined is not None:
            self._roles_before = joined.roles_before
            self._log_process_loss(joined)

    def _store_heartbeat(self):
        """Non-MPI launches: the same monitor over the rendezvous store (reports, cannot survive)."""
        from .heartbeat_store import StoreHeartbeat
        try:
            return StoreHeartbeat(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                                  self.cf.heartbeat_interval_s, self.cf.heartbeat_timeout_s).start()
        except (KeyError, RuntimeError, OSError) as err:  # no reachable store: train without the monitor
            self.log(f"heartbeat monitor off: no rendezvous store reachable ({err})")
            return None

    def _stage_of_rank(self, rank: int):
        if self.world is not None:
            roles = getattr(self, "_roles_before", None) or self.world.roles
            return roles.get(rank)
        return self.engine.grid._topo.get_coord(rank).pipe if self.engine is not None else None

    def _build_engine(self):
        return initialize(self.ds_config, self.args.model, {"num_layers": self.args.num_layers}, args=self.args,
                          base_seed=1234 + self.args.seed, elastic=self.world is not None,
                          dist_timeout_s=self._dp_timeout())

    def _dp_timeout(self) -> float:
        return self.world.dp_timeout_s if self.world is not None else 120.0

    # ------------------------------------------------------------------ bookkeeping
    def _run_info(self) -> dict:
        import deepspeed
        import transformers
        e = self.engine
        return {
            "argv": sys.argv, "args": vars(self.args), "deepspeed_config": self.setup.ds_config,
            "checkfree": self.cf.to_dict(), "model": self.setup.model.to_dict(),
            "model_parameters": self.setup.model.num_parameters(),
            "replica_parameters": self._replica_parameters(),
            "world": {"world_size": self.setup.world_size, "num_stages": e.num_stages,
                      "dp_size": e.grid.get_data_parallel_world_size(), "micro_batches": e.micro_batches,
                      "micro_batch_size": e.train_micro_batch_size_per_gpu(),
                      "stage_layers": [[s.role if s.decoder < 0 else f"decoder{s.decoder}" for s in stage]
                                       for stage in e.module.slots]},
            "data": {"source": self.data.source, "train_tokens": self.data.num_train_tokens,
                     "val_tokens": self.data.num_val_tokens, "seq_len": self.seq_len},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "deepspeed": deepspeed.__version__, "transformers": transformers.__version__},
            "engine": type(e).__name__,
        }

    def _replica_parameters(self) -> int:
        """Extra parameters held because CheckFree+ replicates the (de)embeddings."""
        if self.engine.module.mode != "checkfree_plus":
            return 0
        from .models import EmbeddingPipe, NormHeadPipe
        with torch.device("meta"):
            m = self.setup.model
            return sum(p.numel() for mod in (EmbeddingPipe(m), NormHeadPipe(m)) for p in mod.parameters())

    def log(self, msg: str) -> None:
        if self.is_writer:
            print(msg, flush=True)

    def warn(self, msg: str) -> None:
        """Fault-path messages: printed by every rank (to stderr), each naming itself."""
        if self.world is not None:
            who, stage = f"rank {self.world.rank}", self.world.stage
        else:
            e = self.engine
            who, stage = f"rank {e.global_rank if e else '?'}", e.stage_id if e else None
        print(f"[{who} stage {stage}] {msg}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ failures
    def _dump(self, step: int, tag: str) -> None:
        """Debug aid for tests: this rank's stage state at a recovery boundary."""
        d = self.args.dump_recovery_dir
        if not d:
            return
        e = self.engine
        os.makedirs(d, exist_ok=True)
        state = {k: v.detach().clone() for k, v in e.module.recovery_state(include_replicated=True).items()}
        opt_state = sum(len(s) for s in e.optimizer.state.values()) if hasattr(e.optimizer, "state") else -1
        torch.save({"state": state, "grad_norm_pre_clip": e.grad_norm_pre_clip,
                    "grad_norm_post_clip": e.grad_norm_post_clip, "recovery_norm": e.last_grad_norm(),
                    "decoder_grad_norm_post_clip": e.decoder_grad_norm_post_clip, "lr_scale": e.lr_scale,
                    "effective_lr": e.effective_lr(), "optimizer_state_entries": opt_state,
                    "optimizer_state_dict": e.optimizer.state_dict(),
                    "stage": e.stage_id, "dp": e.grid.get_data_parallel_id()},
                   os.path.join(d, f"step{step}_stage{e.stage_id}_dp{e.grid.get_data_parallel_id()}_{tag}.pt"))
        if self.redundant is not None:
            self.redundant.dump(d, step, tag)

    def handle_failures(self, step: int, failures: list[Failure]) -> int | None:
        """Destroy the lost stages and recover them; returns a step to resume from after a rollback."""
        e = self.engine
        lost = sorted({f.stage for f in failures})
        for f in failures:
            self.metrics.event("failure", step, f.stage, cause=f.cause)
            self.log(f"step {step}: stage {f.stage} lost ({f.cause})")
        self._dump(step, "before")
        if e.stage_id in lost:
            wipe_stage(e, seed=hash(("wipe", step, e.stage_id, e.global_rank)) & 0x7FFFFFFF)
            if self.redundant is not None:
                self.redundant.wipe(seed=hash(("wipe-shadow", step, e.stage_id)) & 0x7FFFFFFF)
            self._dump(step, "wiped")
        try:
            actions = plan_for(e, lost)
        except UnrecoverableFailure as err:
            self.metrics.event("unrecoverable", step, lost[0], stages=lost, reason=str(err))
            raise
        if any(a.method == "checkpoint" for a in actions):
            return self.rollback(step, lost)
        if self.redundant is not None and any(a.method == "redundant" for a in actions):
            records = self.redundant.recover(actions, step)
        else:
            records = apply_plan(e, actions, step)
        for r in records:
            self.metrics.event("recovery", step, r.stage, **r.as_event())
            self.log(f"step {step}: stage {r.stage} rebuilt by {r.method} from {r.sources} "
                     f"(weights {[round(w, 4) for w in r.weights]}, {r.seconds * 1e3:.1f} ms, "
                     f"{r.bytes_received / 1e6:.2f} MB)")
        self._dump(step, "after")
        return None

    # ------------------------------------------------------------------ real process loss
    def recover_from_process_loss(self, step: int, reason: str) -> int:
        """The data plane broke (a stage's process died): agree, rebuild, re-materialise.

        Returns the step to continue from (the interrupted step is redone)."""
        failed_at = time.time()
        self.warn(f"step {step}: data plane error ({reason}); agreeing on the survivors")
        # Keep the in-memory state, then drop every reference to the old engine so that its
        # gloo groups really close: peers still blocked on us then fail at once.
        self._snapshot = _snapshot(self.engine)
        _release_engine(self.engine)
        self.engine = None
        _forget_deepspeed_groups()
        self.world.tear_down_data_plane()
        from .elastic import NoSpareLeft
        self._roles_before = dict(self.world.roles)
        self._stage_before = self.world.stage
        try:
            agreement = self.world.agree(steps_done=self.steps_done)
        except NoSpareLeft as no_spare:
            self._log_heartbeat_events(step)
            self.metrics.event("unrecoverable", step, None, reason=str(no_spare))
            self._save_survivor_state(step)
            raise
        self.warn(f"agreed: dead MPI ranks {agreement.dead_ranks}, lost stages {agreement.lost_stages}, "
                  f"replacements {agreement.replacements}, redo from step {agreement.resume_step}")
        try:
            self._rebuild(agreement, failed_at=failed_at, reason=reason)
        except UnrecoverableFailure as err:
            self._log_heartbeat_events(step)
            self.metrics.event("unrecoverable", step, agreement.lost_stages[0], stages=agreement.lost_stages,
                               dead_ranks=agreement.dead_ranks, reason=str(err))
            raise
        self._log_process_loss(agreement)
        return agreement.resume_step

    def _rebuild(self, agreement, failed_at: float, reason: str):
        """New gloo group and DeepSpeed engine around this rank's in-memory state, then CheckFree."""
        t0 = time.time()
        self.world.init_data_plane()
        t_plane = time.time()
        snapshot, self._snapshot = getattr(self, "_snapshot", None), None
        engine, setup = self._build_engine()
        if snapshot is not None:
            _restore(engine, snapshot)
        self.engine = engine
        t_built = time.time()
        actions = plan_for(engine, agreement.lost_stages)  # UnrecoverableFailure: same verdict on every rank
        if any(a.method == "checkpoint" for a in actions):
            records = []
            agreement.resume_step = self._elastic_rollback(engine, agreement)
        else:
            records = apply_plan(engine, actions, agreement.resume_step)
        t_remat = time.time()
        self.recovery_records = records
        self.timeline = {"failed_at": failed_at, "error": reason, "revoked_at": agreement.revoked_at,
                         "agreed_at": agreement.agreed_at, "data_plane_at": t_plane, "engine_at": t_built,
                         "rematerialised_at": t_remat, "agreement_s": round(agreement.agreed_at - agreement.revoked_at, 4),
                         "data_plane_s": round(t_plane - t0, 4), "engine_rebuild_s": round(t_built - t_plane, 4),
                         "rematerialise_s": round(t_remat - t_built, 4), "resume_step": agreement.resume_step}
        return setup

    def _save_survivor_state(self, step: int) -> None:
        """Stopping for good: if the config names a checkpoint directory, each survivor writes
        its stage's in-memory state (module and optimizer) there without any collective, so
        that a restarted job can rebuild the lost stage from its neighbours' files."""
        directory = self.cf.checkpoint_dir or self.cf.fallback_checkpoint_dir
        snap = getattr(self, "_snapshot", None)
        if not directory or snap is None:
            return
        path = os.path.join(directory, f"stopped_step{step}", f"stage{self._stage_before}.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        t0 = time.perf_counter()
        torch.save({"step_completed": self.steps_done, "stage": self._stage_before, **snap}, path)
        self.metrics.event("checkpoint_save", step, self._stage_before, seconds=round(time.perf_counter() - t0, 6),
                           bytes=os.path.getsize(path), partial=True, path=path)
        self.warn(f"saved this stage's state to {path} before stopping")

    def _elastic_rollback(self, engine, agreement) -> int:
        """No CheckFree rule for the lost stage: every rank (the newcomer too) reloads the
        last DeepSpeed checkpoint; returns the step to resume from."""
        cf = engine.checkfree
        directory = cf.checkpoint_dir or cf.fallback_checkpoint_dir
        if not _has_checkpoint(directory):
            raise UnrecoverableFailure(f"stages {agreement.lost_stages} lost and no checkpoint exists yet in "
                                       f"{directory!r}")
        t0 = time.perf_counter()
        _, client = engine.load_checkpoint(directory)
        torch.distributed.barrier()
        seconds = time.perf_counter() - t0
        resume = int(client["step"]) + 1
        engine.lr_scale = 1.0
        self._pending_events.append(("checkpoint_load", {"seconds": round(seconds, 6), "resumed_from": resume - 1,
                                                         "stages": agreement.lost_stages,
                                                         "steps_lost": agreement.resume_step - resume}))
        self.warn(f"rolled back to the checkpoint of step {resume - 1} ({seconds:.2f} s)")
        return resume

    def _log_process_loss(self, agreement) -> None:
        step = agreement.resume_step
        self._log_heartbeat_events(step)
        for stage in agreement.lost_stages:
            rank = agreement.replacements[stage]
            self.metrics.event("failure", step, stage, cause="process_lost",
                               dead_ranks=agreement.dead_ranks, replaced_by_rank=rank)
            self.log(f"step {step}: stage {stage} lost (process died, MPI ranks {agreement.dead_ranks}); "
                     f"spare rank {rank} takes its place")
        for name, fields in self._pending_events:
            self.metrics.event(name, step, None, **fields, **self.timeline)
        self._pending_events = []
        for r in self.recovery_records:
            self.metrics.event("recovery", step, r.stage, **r.as_event(), **self.timeline)
            self.log(f"step {step}: stage {r.stage} rebuilt by {r.method} from {r.sources} in "
                     f"{r.seconds * 1e3:.1f} ms (agreement {self.timeline['agreement_s']:.2f} s, data plane "
                     f"{self.timeline['data_plane_s']:.2f} s, engine {self.timeline['engine_rebuild_s']:.2f} s)")

    def _log_heartbeat_events(self, step: int) -> None:
        if self.heartbeat is None:
            return
        for ev in self.heartbeat.events():
            stage = self._stage_of_rank(ev["peer"])
            self.metrics.event("heartbeat_timeout", step, stage, peer_rank=ev["peer"], reason=ev["reason"],
                               detected_at=ev["time"], role="spare" if stage is None else "stage")
            if self.world is None:
                self.warn(f"rank {ev['peer']} (stage {stage}) {ev['reason']}: under this launcher a lost process "
                          "ends the job; use mpirun --with-ft ulfm with spares to survive it")

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int) -> None:
        e = self.engine
        t0 = time.perf_counter()
        e.save_checkpoint(self.checkpoint_dir, tag=f"step{step}", client_state={"step": step})
        torch.distributed.barrier()
        seconds = time.perf_counter() - t0
        self.last_checkpoint_step = step
        self._dump(step, "checkpoint")
        size = _dir_bytes(os.path.join(self.checkpoint_dir, f"step{step}"))
        self.metrics.event("checkpoint_save", step, None, seconds=round(seconds, 6), bytes=size,
                           **self._charged(size))

    def resume(self, directory: str) -> int:
        """A restarted job: load the latest DeepSpeed checkpoint, return the step to start at."""
        t0 = time.perf_counter()
        tag_path, client = self.engine.load_checkpoint(directory)
        torch.distributed.barrier()
        seconds = time.perf_counter() - t0
        if tag_path is None or client is None or "step" not in client:
            raise UnrecoverableFailure(f"--resume_from {directory!r}: the checkpoint could not be loaded")
        resume = int(client["step"]) + 1
        self.metrics.event("checkpoint_load", resume, None, seconds=round(seconds, 6), resumed_from=resume - 1,
                           bytes=_dir_bytes(os.path.dirname(tag_path) if os.path.isfile(tag_path) else tag_path),
                           restart=True)
        self.log(f"resumed from the checkpoint of step {resume - 1} in {directory} ({seconds:.2f} s)")
        return resume

    def _charged(self, size: int) -> dict:
        """``storage_bandwidth_mb_s``: what moving ``size`` bytes would take on that storage."""
        bw = self.cf.storage_bandwidth_mb_s
        return {"charged_s": round(size / (bw * 1e6), 6), "bandwidth_mb_s": bw} if bw else {}

    def rollback(self, step: int, lost: list[int]) -> int:
        """All ranks reload the last DeepSpeed checkpoint; training resumes after it."""
        e = self.engine
        if self.last_checkpoint_step is None and not _has_checkpoint(self.checkpoint_dir):
            raise UnrecoverableFailure(f"stages {lost} lost at step {step} and no checkpoint exists yet in "
                                       f"{self.checkpoint_dir!r}")
        t0 = time.perf_counter()
        _, client = e.load_checkpoint(self.checkpoint_dir)
        torch.distributed.barrier()
        seconds = time.perf_counter() - t0
        resume = int(client["step"]) + 1
        e.lr_scale = 1.0
        if self.redundant is not None:
            self.redundant.resync()  # shadows must mirror the reloaded state
        self._dump(step, "rollback")
        size = _dir_bytes(os.path.join(self.checkpoint_dir, f"step{resume - 1}"))
        self.metrics.event("checkpoint_load", step, None, seconds=round(seconds, 6), resumed_from=resume - 1,
                           stages=lost, steps_lost=step - resume, bytes=size, **self._charged(size))
        self.log(f"step {step}: rolled back to the checkpoint of step {resume - 1} ({seconds:.2f} s)")
        return resume

    # ------------------------------------------------------------------ loop
    def evaluate(self) -> float:
        val = self.engine.eval_batch(iter(self.data.val), num_micro_batches=len(self.data.val))
        return float(val)

    def run(self) -> int:
        e, args = self.engine, self.args
        self.log(f"training {self.setup.model.name} ({self.setup.model.num_parameters() / 1e6:.2f}M params) on "
                 f"{e.num_stages} stages x {e.grid.get_data_parallel_world_size()} replicas, mode "
                 f"{self.cf.mode}, {args.steps} steps, {self.tokens_per_step} tokens/step")
        replica = self._replica_parameters()
        if replica:
            self.log(f"CheckFree+ replicas: {replica} extra parameters ({replica * 4 / 1e6:.2f} MB fp32) on stages "
                     f"1 and {e.num_stages - 2}")
        if getattr(args, "resume_from", None) and self.start_step == 1:
            self.start_step = self.resume(args.resume_from)
        started = getattr(args, "process_started_at", None)
        self.metrics.event("run_start", self.start_step, None, process_started_at=started,
                           engine_ready_at=self._engine_ready_at,
                           startup_s=round(self._engine_ready_at - started, 4) if started else None)
        step, done_steps, start = self.start_step, 0, time.perf_counter()
        self.steps_done = step - 1
        e.set_dataiterator(self.data.train.iterator((step - 1) * e.micro_batches))
        if self.cf.checkpoint_every and self.start_step == 1:
            self.save_checkpoint(0)  # a restart from scratch is a rollback to step 0
        while step <= args.steps:
            # A failure is an event in time: a step redone after a rollback does not fail again.
            failures = [f for f in self.plan.failures_at(step) if (f.step, f.stage) not in self._fired]
            self._fired.update((f.step, f.stage) for f in failures)
            if failures:
                resume = self.handle_failures(step, failures)
                if resume is not None:
                    step = resume
                    e.set_dataiterator(self.data.train.iterator((step - 1) * e.micro_batches))
                    continue
            t0 = time.perf_counter()
            loss, broken = self._data_plane(lambda: float(e.train_batch()))
            if broken is not None:  # outside any except block: the traceback (and engine) is released
                e = None
                step = self.recover_from_process_loss(step, broken)
                e = self.engine
                e.set_dataiterator(self.data.train.iterator((step - 1) * e.micro_batches))
                continue
            redundant = self.redundant.after_step() if self.redundant is not None else None
            dt = time.perf_counter() - t0
            done_steps += 1
            self.steps_done = step
            if self.timeline is not None:
                self.metrics.event("recovery_timeline", step, None, **self.timeline, next_step_done_at=time.time(),
                                   total_s=round(time.time() - self.timeline["failed_at"], 4))
                self.timeline = None
            self._log_heartbeat_events(step)
            norms = [n[1] if self.cf.grad_norm == "post_clip" else n[0] for n in e.stage_grad_norms]
            extra = {"redundant_overhead": redundant} if redundant is not None else {}
            self.metrics.step(step, loss, e.effective_lr(), round(dt, 6), round(self.tokens_per_step / dt, 2), norms,
                              **extra,
                              grad_norms_pre_clip=[n[0] for n in e.stage_grad_norms])
            elapsed = time.perf_counter() - start
            eta = elapsed / done_steps * (args.steps - step)
            self.log(f"step {step}/{args.steps} loss {loss:.4f} lr {e.effective_lr():.2e} "
                     f"{self.tokens_per_step / dt:,.0f} tok/s {dt:.2f} s/step ETA {_fmt_eta(eta)}")
            broken = None
            if self.cf.checkpoint_every and step % self.cf.checkpoint_every == 0:
                _, broken = self._data_plane(lambda: self.save_checkpoint(step))
            if broken is None and ((args.eval_every and step % args.eval_every == 0) or step == args.steps):
                val, broken = self._data_plane(self.evaluate)
                if broken is None:
                    self.metrics.validation(step, val)
                    self.log(f"step {step}: validation loss {val:.4f}")
            if broken is not None:  # lost after the step completed: nothing to redo
                e = None
                self.warn(f"step {step}: the failure interrupted the checkpoint/validation after the step")
                step = self.recover_from_process_loss(step + 1, broken)
                e = self.engine
                e.set_dataiterator(self.data.train.iterator((step - 1) * e.micro_batches))
                continue
            step += 1
        self.log(f"done: {args.steps} steps in {time.perf_counter() - start:.1f} s")
        if self.redundant is not None:
            self.metrics.event("redundant_overhead", args.steps, None, stages=self.redundant.summary())
        if self.heartbeat is not None:
            self._log_heartbeat_events(args.steps)
            self.metrics.event("heartbeat_summary", args.steps, None, **self.heartbeat.summary())
        self.metrics.close()
        self.shutdown()
        return 0

    def _data_plane(self, fn):
        """Run a collective piece of training; under the elastic launch a broken data plane
        (a peer's process died) is returned as a reason instead of raised."""
        try:
            return fn(), None
        except Exception as err:  # noqa: BLE001 - only the elastic launch can survive it
            if self.world is None:
                raise
            return None, f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"

    def shutdown(self) -> None:
        """Leave together and tear the process group down before interpreter exit
        (gloo threads still alive at exit can abort the process)."""
        if self.world is None and self.heartbeat is not None:
            self.heartbeat.stop()  # before the store's host (rank 0) goes away
        if self.world is not None and self.world.rank == min(self.world.stage_ranks()):
            self.world.release_spares()
        if torch.distributed.is_initialized():
            _, broken = self._data_plane(torch.distributed.barrier)
            if broken is not None:  # training is complete; a peer lost now changes nothing
                self.warn(f"a peer was lost after the last step ({broken}); exiting")
                return
            torch.distributed.destroy_process_group()


def _release_engine(engine) -> None:
    """Break the reference cycles that would keep a dropped engine (a whole stage's weights,
    optimizer state and process groups) alive: DeepSpeed ties backward-hook managers, whose
    closures hold the engine, to the output tensors of the interrupted step, through autograd
    where the garbage collector cannot see them."""
    def visit(x, depth=0):
        if isinstance(x, torch.Tensor):
            for manager in getattr(x, "_backward_hook_managers", ()):
                manager.remove_hooks()
            if hasattr(x, "_backward_hook_managers"):
                del x._backward_hook_managers
        elif depth < 3 and isinstance(x, (list, tuple)):
            for item in x:
                visit(item, depth + 1)
        elif depth < 3 and isinstance(x, dict):
            for item in x.values():
                visit(item, depth + 1)
    for name, value in list(vars(engine).items()):
        if isinstance(value, (torch.Tensor, list, tuple, dict)):
            visit(value)
            if name in ("pipe_buffers", "_routed_losses", "_routed_grads", "fwd_outputs", "total_loss", "agg_loss",
                        "loss", "dp_group_loss", "agg_train_loss"):
                setattr(engine, name, None)


def _forget_deepspeed_groups() -> None:
    """Drop every reference to the old process groups that DeepSpeed keeps: the p2p module's
    globals, and the grids, modules and engines still reachable through reference cycles
    the collector cannot see (their attributes are cleared, which releases the groups)."""
    import gc

    from deepspeed.runtime.pipe import p2p
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from deepspeed.runtime.pipe.module import PipelineModule
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid
    from deepspeed.runtime.utils import OutputBackwardHookManager
    for name in ("_grid", "_groups"):
        if hasattr(p2p, name):
            setattr(p2p, name, None)
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some lazy torch objects warns about deprecations
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, OutputBackwardHookManager):
                obj.remove_hooks()
            elif isinstance(obj, PipelineModule):
                obj.tied_comms = {}
                obj._grid = None
            elif isinstance(obj, (PipelineEngine, PipelineParallelGrid)):
                obj.__dict__.clear()
    gc.collect()


def _snapshot(engine) -> dict:
    """This rank's in-memory training state, to carry into the rebuilt engine."""
    return {"module": {k: v.detach().clone() for k, v in engine.module.state_dict().items()},
            "optimizer": copy.deepcopy(engine.optimizer.state_dict()), "lr_scale": engine.lr_scale,
            "norms": (engine.grad_norm_pre_clip, engine.grad_norm_post_clip, engine.decoder_grad_norm_pre_clip,
                      engine.decoder_grad_norm_post_clip), "global_steps": engine.global_steps,
            "global_samples": engine.global_samples}


def _restore(engine, snap: dict) -> None:
    engine.module.load_state_dict(snap["module"])
    engine.optimizer.load_state_dict(snap["optimizer"])
    engine.lr_scale = snap["lr_scale"]
    (engine.grad_norm_pre_clip, engine.grad_norm_post_clip, engine.decoder_grad_norm_pre_clip,
     engine.decoder_grad_norm_post_clip) = snap["norms"]
    engine.global_steps, engine.global_samples = snap["global_steps"], snap["global_samples"]


def _dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def _has_checkpoint(path: str | None) -> bool:
    return bool(path) and os.path.exists(os.path.join(path, "latest"))
