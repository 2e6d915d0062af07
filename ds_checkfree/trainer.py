"""The training loop of ``launch/train.py``: one user of ``ds_checkfree.Manager``.

The ``Manager`` owns the engine and every way it is lost and rebuilt (logical failures, real
process deaths, preemption hand-offs); the trainer owns the data, the baseline's periodic
checkpoints, validation, metrics rows and progress lines, and the order of things within a step.
"""
from __future__ import annotations

import os
import time

import torch

from ds_checkfree.data import build_data
from ds_checkfree.debug_dump import dump_stage
from ds_checkfree.manager import Manager
from ds_checkfree.metrics import write_run_json
from ds_checkfree.run_info import announcement, fmt_eta, run_info


class Trainer:
    """Owns the data and the metrics rows for one run; the ``Manager`` owns the engine."""

    def __init__(self, options, setup, world=None, joined=None):
        """``setup``: the validated configuration (``initialize.prepare``); ``world``: the
        MPI fault-tolerant launch (``ds_checkfree.elastic``); ``joined``: this process is a
        spare that takes a lost stage's place now (the ``Agreement`` that gave it one)."""
        self.options, self.setup, self.cf, self.world = options, setup, setup.checkfree, world
        torch.manual_seed(options.seed)
        self.ft = Manager(setup, world=world, joined=joined, base_seed=1234 + options.seed,
                          output_dir=options.output_dir, dump=self._dump_engine)
        ft, e = self.ft, self.ft.engine
        self.checkpoints, self.is_writer = ft.checkpoints, ft.is_writer
        self.start_step = ft.start_step
        self.seq_len = options.seq_len or setup.model.max_seq_len
        self.data = build_data(options.data, self.seq_len, e.train_micro_batch_size_per_gpu(), seed=options.seed,
                               dp_rank=e.grid.get_data_parallel_id(), dp_size=e.grid.get_data_parallel_world_size(),
                               max_val_batches=options.eval_batches, tokenizer=getattr(setup.model, "tokenizer", None))
        vocab = getattr(setup.model, "vocab_size", None)
        if vocab is not None and self.data.tokenizer.vocab_size > vocab:
            raise ValueError(f"model vocab_size {vocab} is smaller than the tokenizer's {self.data.tokenizer.vocab_size}")
        if options.save_failure_schedule and e.global_rank == 0:
            ft.plan.save(options.save_failure_schedule, options.steps)
        self.tokens_per_step = e.train_batch_size() * self.seq_len
        if self.is_writer and options.output_dir and joined is None:
            write_run_json(options.output_dir, run_info(e, setup, options, self.data, self.seq_len))
        ft.report_start()

    @property
    def engine(self):
        return self.ft.engine

    @property
    def metrics(self):
        return self.ft.metrics

    @property
    def steps_done(self) -> int:
        return self.ft.steps_done

    # ------------------------------------------------------------------ the loop
    def run(self, monitor=None) -> int:
        """Train to ``options.steps``; ``monitor``: the heartbeat monitor, read at step boundaries."""
        ft = self.ft
        ft.monitor = monitor
        self._announce()
        step, start = self._first_step(), time.perf_counter()
        while step <= self.options.steps:
            resume = ft.begin(step)
            if resume != step:  # rolled back to a checkpoint
                step = self._restart_data(resume)
                continue
            t0 = time.perf_counter()
            loss = ft.run(step, lambda engine: float(engine.train_batch()))
            if loss is None:  # a process died: recovered around a new engine
                step = self._restart_data(ft.resume_step)
                continue
            self._record_step(step, loss, time.perf_counter() - t0, time.perf_counter() - start)
            # a peer lost during the step's periodic work is lost before step + 1: nothing to redo
            if ft.run(step + 1, lambda engine: self._after_step(step) or True) is None:
                self.ft.warn(f"step {step}: the failure interrupted the checkpoint/validation after the step")
                step = self._restart_data(ft.resume_step)
                continue
            ft.preempted(step, self.options.steps)
            step += 1
        self.log(f"done: {self.options.steps} steps in {time.perf_counter() - start:.1f} s")
        hf_out = self.options.save_hf or (self.options.output_dir and getattr(self.setup.model, "hf_dir", None)
                                          and os.path.join(self.options.output_dir, "hf"))
        if hf_out:
            ft.save_hf(hf_out)
        ft.finish(self.options.steps)
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
        self.metrics.event("run_start", step, None, process_started_at=started, engine_ready_at=self.ft.engine_ready_at,
                           startup_s=round(self.ft.engine_ready_at - started, 4) if started else None)
        self.ft.steps_done = step - 1
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

    # ------------------------------------------------------------------ reporting
    def _announce(self) -> None:
        for line in announcement(self.engine, self.setup, self.options.steps, self.tokens_per_step):
            self.log(line)

    def _record_step(self, step: int, loss: float, dt: float, elapsed: float) -> None:
        e = self.engine
        redundant = self.ft.redundant.after_step() if self.ft.redundant is not None else None
        self.ft.completed(step)  # a preceding recovery's timeline, heartbeat events
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
        self._dump_engine(self.engine, step, tag)

    def _dump_engine(self, engine, step: int, tag: str) -> None:
        dump_stage(self.options.dump_recovery_dir, engine, step, tag, self.ft.redundant)

    def log(self, msg: str) -> None:
        self.ft.log(msg)

    def warn(self, msg: str) -> None:
        """Fault-path messages: printed by every rank (to stderr), each naming itself."""
        self.ft.warn(msg)
