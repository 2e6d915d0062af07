"""The training loop of ``launch/train.py``: steps, validation, failures, recovery, metrics.

Failures are decided by a seeded ``FailurePlan`` that every rank evaluates identically, so
all ranks agree on who is lost at a step boundary without exchanging a message. Recovery
then runs the CheckFree rules (or rolls back to a DeepSpeed checkpoint where they cannot
apply, or stops with an error that says why).
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time

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

    def __init__(self, args, ds_config: dict):
        self.args = args
        torch.manual_seed(args.seed)
        self.engine, self.setup = initialize(ds_config, args.model, {"num_layers": args.num_layers}, args=args,
                                             base_seed=1234 + args.seed)
        e = self.engine
        self.cf = self.setup.checkfree
        self.writer_rank = e.grid.stage_to_global(stage_id=e.num_stages - 1, data=0)
        self.is_writer = e.global_rank == self.writer_rank
        self.metrics = MetricsWriter(args.output_dir, enabled=self.is_writer)
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
        if self.is_writer and args.output_dir:
            write_run_json(args.output_dir, self._run_info())

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
                    "grad_norm_post_clip": e.grad_norm_post_clip, "lr_scale": e.lr_scale,
                    "effective_lr": e.effective_lr(), "optimizer_state_entries": opt_state,
                    "stage": e.stage_id, "dp": e.grid.get_data_parallel_id()},
                   os.path.join(d, f"step{step}_stage{e.stage_id}_dp{e.grid.get_data_parallel_id()}_{tag}.pt"))

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
            self._dump(step, "wiped")
        try:
            actions = plan_for(e, lost)
        except UnrecoverableFailure as err:
            self.metrics.event("unrecoverable", step, lost[0], stages=lost, reason=str(err))
            raise
        if any(a.method == "checkpoint" for a in actions):
            return self.rollback(step, lost)
        records = apply_plan(e, actions, step)
        for r in records:
            self.metrics.event("recovery", step, r.stage, **r.as_event())
            self.log(f"step {step}: stage {r.stage} rebuilt by {r.method} from {r.sources} "
                     f"(weights {[round(w, 4) for w in r.weights]}, {r.seconds * 1e3:.1f} ms, "
                     f"{r.bytes_received / 1e6:.2f} MB)")
        self._dump(step, "after")
        return None

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int) -> None:
        e = self.engine
        t0 = time.perf_counter()
        e.save_checkpoint(self.checkpoint_dir, tag=f"step{step}", client_state={"step": step})
        torch.distributed.barrier()
        seconds = time.perf_counter() - t0
        self.last_checkpoint_step = step
        self.metrics.event("checkpoint_save", step, None, seconds=round(seconds, 6),
                           bytes=_dir_bytes(os.path.join(self.checkpoint_dir, f"step{step}")))

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
        self.metrics.event("checkpoint_load", step, None, seconds=round(seconds, 6), resumed_from=resume - 1,
                           stages=lost, steps_lost=step - resume)
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
        step, done_steps, start = 1, 0, time.perf_counter()
        e.set_dataiterator(self.data.train.iterator(0))
        if self.cf.checkpoint_every:
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
            loss = float(e.train_batch())
            dt = time.perf_counter() - t0
            done_steps += 1
            norms = [n[1] if self.cf.grad_norm == "post_clip" else n[0] for n in e.stage_grad_norms]
            self.metrics.step(step, loss, e.effective_lr(), round(dt, 6), round(self.tokens_per_step / dt, 2), norms,
                              grad_norms_pre_clip=[n[0] for n in e.stage_grad_norms])
            elapsed = time.perf_counter() - start
            eta = elapsed / done_steps * (args.steps - step)
            self.log(f"step {step}/{args.steps} loss {loss:.4f} lr {e.effective_lr():.2e} "
                     f"{self.tokens_per_step / dt:,.0f} tok/s {dt:.2f} s/step ETA {_fmt_eta(eta)}")
            if self.cf.checkpoint_every and step % self.cf.checkpoint_every == 0:
                self.save_checkpoint(step)
            if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
                val = self.evaluate()
                self.metrics.validation(step, val)
                self.log(f"step {step}: validation loss {val:.4f}")
            step += 1
        self.log(f"done: {args.steps} steps in {time.perf_counter() - start:.1f} s")
        self.metrics.close()
        self.shutdown()
        return 0

    def shutdown(self) -> None:
        """Leave together and tear the process group down before interpreter exit
        (gloo threads still alive at exit can abort the process)."""
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def _dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def _has_checkpoint(path: str | None) -> bool:
    return bool(path) and os.path.exists(os.path.join(path, "latest"))
