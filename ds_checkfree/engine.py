"""CheckFreePipelineEngine: DeepSpeed's PipelineEngine plus CheckFree's hooks.

Kept thin on purpose. It adds
  * the schedule hook: DeepSpeed's ``TrainSchedule`` for CheckFree, the out-of-order
    schedule (``ds_checkfree.schedule``) for CheckFree+, executed by routed instructions
    that talk to any stage, not only stage +- 1;
  * the stage's recovery state (``StageRecoveryState``: the last step's gradient norms
    before and after clipping, the learning-rate multiplier a rebuilt stage keeps), and the
    operations that change it: wipe the stage, install recovered weights, carry the stage
    into a rebuilt engine. Recovery plans are applied by ``ds_checkfree.recovery_runtime``.
Everything else is DeepSpeed's own code path.
"""
from __future__ import annotations

import torch
from deepspeed import comm as dist
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe import schedule as ds_schedule
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.utils import clip_grad_norm_

from . import schedule as cf_schedule
from .config import CheckFreeConfig
from .stage_state import StageRecoveryState

_META_LEN = 10  # dtype id, ndim, up to 8 dims


def _squared_grad_norm(params) -> float:
    """Sum of squared gradient entries, in one vectorised pass and one host sync."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.stack(torch._foreach_norm(grads)).double().pow(2).sum())


class CheckFreePipelineEngine(PipelineEngine):
    """PipelineEngine with the CheckFree schedule, gradient-norm record and recovery hooks."""

    def __init__(self, *args, checkfree_config: CheckFreeConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.checkfree = checkfree_config
        self.stage_state = StageRecoveryState()
        self.global_grad_norm = float("nan")
        #: [stage] -> (pre-clip, post-clip) norm of the last step over ``checkfree.norm_scope``
        #: (the norms recovery weighs neighbours by), gathered over the pipeline
        self.stage_grad_norms: list[tuple[float, float]] = [(float("nan"), float("nan"))] * self.num_stages
        self._routed_losses: dict[int, torch.Tensor] = {}
        self._routed_grads: dict[int, torch.Tensor] = {}
        self._meta_sent: set[tuple[str, int]] = set()
        self._recv_templates: dict[tuple[str, int], tuple[torch.dtype, list[int]]] = {}
        self._passing_grad_through = False

    # ------------------------------------------------------------------ schedule hook
    @property
    def routed(self) -> bool:
        """True when the out-of-order (CheckFree+) schedule drives training."""
        return self.module.mode == "checkfree_plus"

    def _train_schedule(self):
        if self.routed:
            return cf_schedule.OutOfOrderSchedule(micro_batches=self.micro_batches, stages=self.num_stages,
                                                  stage_id=self.stage_id, swap=self.checkfree.swap)
        return super()._train_schedule()

    @property
    def lr_scale(self) -> float:
        return self.stage_state.lr_scale

    def last_grad_norm(self) -> float:
        """The norm that recovery weights this stage by (config: before or after clipping,
        over the decoder layers or the whole stage)."""
        return self.stage_state.norm(self.checkfree.grad_norm, self.checkfree.norm_scope)

    # ------------------------------------------------------------------ stage state changes
    def reset_optimizer_state(self) -> None:
        """Drop Adam moments and step counts of this rank: a fresh node starts from nothing."""
        opt = self.optimizer
        while opt is not None:
            state = getattr(opt, "state", None)
            if isinstance(state, dict):
                state.clear()
            opt = getattr(opt, "optimizer", None)

    def wipe_stage(self, seed: int) -> None:
        """Logical failure: destroy everything this rank held for its stage.

        Parameters are overwritten with fresh random values (a replacement node has not seen
        the old weights), gradients and optimizer state are dropped, and the learning-rate
        multiplier returns to 1 until recovery sets it."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))
                p.grad = None
        self.reset_optimizer_state()
        self.stage_state.reset()

    def install_recovered(self, weights: dict, lr_scale: float, include_replicated: bool) -> None:
        """A rebuilt stage: these weights, fresh optimizer state, the learning-rate factor
        (set, not multiplied: a second failure does not compound)."""
        template = self.module.recovery_state(include_replicated=include_replicated)
        with torch.no_grad():
            for key, param in template.items():
                param.copy_(weights[key])
                param.grad = None
        self.reset_optimizer_state()
        self.stage_state.reset()
        self.stage_state.lr_scale = lr_scale

    def reset_lr_scale(self) -> None:
        """After a rollback or an exact restore nothing needs compensating."""
        self.stage_state.lr_scale = 1.0

    def training_state(self) -> dict:
        """A copy of this rank's whole stage in memory, to carry into a rebuilt engine."""
        import copy
        return {"module": {k: v.detach().clone() for k, v in self.module.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "stage_state": self.stage_state.snapshot(),
                "global_steps": self.global_steps, "global_samples": self.global_samples}

    def load_training_state(self, snap: dict) -> None:
        self.module.load_state_dict(snap["module"])
        self.optimizer.load_state_dict(snap["optimizer"])
        self.stage_state.load(snap["stage_state"])
        self.global_steps, self.global_samples = snap["global_steps"], snap["global_samples"]

    def _decoder_params(self):
        return list(self.module.recovery_state(include_replicated=False).values())

    # ------------------------------------------------------------------ optimizer step
    def _exec_optimizer_step(self, lr_kwargs=None):
        decoder = self._decoder_params()
        ids = {id(p) for p in decoder}
        decoder_sq = _squared_grad_norm(decoder)
        rest_sq = _squared_grad_norm(p for p in self.module.parameters() if id(p) not in ids)
        self.stage_state.record_pre_clip(decoder_sq + rest_sq, decoder_sq)  # clipping scales them later
        groups = self.optimizer.param_groups
        if self.lr_scale != 1.0:
            for g in groups:
                g["lr"] *= self.lr_scale
        try:
            PipelineEngine._exec_optimizer_step(self, lr_kwargs)
        finally:
            # A DeepSpeed scheduler rewrites lr from its own formula after the step; without one,
            # undo the multiplier so it never compounds.
            if self.lr_scale != 1.0 and self.lr_scheduler is None:
                for g in groups:
                    g["lr"] /= self.lr_scale
        self._gather_grad_norms()

    def clip_fp32_gradients(self):
        max_norm = self.gradient_clipping()
        total = clip_grad_norm_(parameters=self.module.parameters(), max_norm=max_norm, mpu=self.mpu)
        self.global_grad_norm = float(total)
        # DeepSpeed multiplies every gradient by min(1, max_norm / (total + 1e-6)): the
        # post-clip norms follow without another pass over the gradients
        self.stage_state.record_clip_factor(min(1.0, float(max_norm) / (self.global_grad_norm + 1e-6)))

    def _gather_grad_norms(self):
        mine = torch.tensor(self.stage_state.pair(self.checkfree.norm_scope), dtype=torch.float64)
        if self.num_stages == 1:
            self.stage_grad_norms = [tuple(mine.tolist())]
            return
        out = [torch.zeros_like(mine) for _ in range(self.num_stages)]
        dist.all_gather(out, mine, group=self.grid.get_pipe_parallel_group())
        self.stage_grad_norms = [tuple(t.tolist()) for t in out]

    def effective_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"] * self.lr_scale

    def _exec_reduce_tied_grads(self):
        # A replica that ran no micro-batch this step (CheckFree+ with swapping off) has no
        # gradient; give it zeros so every owner joins the all-reduce instead of hanging.
        for weight, _ in self.module.get_tied_weights_and_groups():
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
        return PipelineEngine._exec_reduce_tied_grads(self)

    # ------------------------------------------------------------------ routed execution
    def _peer_rank(self, stage: int) -> int:
        return self.grid.stage_to_global(stage_id=stage)

    def set_dataiterator(self, iterator):
        # Under the out-of-order schedule any stage may start or end a micro-batch.
        if self.routed:
            self.training_dataloader = None
            self.data_iterator = iterator
        else:
            super().set_dataiterator(iterator)

    def _exec_load_routed(self, buffer_id, micro_batch, inputs, labels):
        batch = self._next_batch()  # every stage pulls every micro-batch: iterators stay in step
        if inputs:
            self.pipe_buffers["inputs"][buffer_id] = batch[0].clone().detach().to(self.device)
        if labels:
            self.pipe_buffers["labels"][buffer_id] = batch[1].to(self.device)

    def _exec_forward_routed(self, buffer_id, micro_batch, swapped, first, computes_loss):
        inputs = self.pipe_buffers["inputs"][buffer_id]
        self.module.set_order(swapped)
        try:
            outputs = DeepSpeedEngine.forward(self, inputs)
        finally:
            self.module.set_order(False)
        self.pipe_buffers["outputs"][buffer_id] = outputs
        if computes_loss:
            loss = self.module.loss_fn(outputs, self.pipe_buffers["labels"][buffer_id])
            self._routed_losses[buffer_id] = loss
            self.fwd_outputs.append(loss.detach())
            self.total_loss = loss.detach().clone() if self.total_loss is None else self.total_loss + loss.detach()

    def _exec_backward_routed(self, buffer_id, micro_batch, computes_loss, first):
        if computes_loss:
            DeepSpeedEngine.backward(self, self._routed_losses.pop(buffer_id))
        else:
            outputs = self.pipe_buffers["outputs"][buffer_id]
            grad = self._routed_grads.pop(buffer_id)
            self._passing_grad_through = True
            self._running_engine_backward = True
            try:
                outputs.backward(gradient=grad)
            finally:
                self._running_engine_backward = False
                self._passing_grad_through = False
        self.pipe_buffers["outputs"][buffer_id] = None
        if first:
            self.pipe_buffers["inputs"][buffer_id] = None

    def _backward_prologue_per_tensor(self, grad):
        # A gradient received from another stage is already scaled by the loss stage.
        if self._passing_grad_through:
            return grad
        return super()._backward_prologue_per_tensor(grad)

    def _send_meta_once(self, kind: str, tensor: torch.Tensor, peer: int):
        if (kind, peer) in self._meta_sent and not self.dynamic_shape:
            return
        meta = torch.zeros(_META_LEN, dtype=torch.int64)
        meta[0] = self.DTYPE_TO_ID[tensor.dtype]
        meta[1] = tensor.dim()
        meta[2:2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
        dist.send(meta, self._peer_rank(peer))
        self._meta_sent.add((kind, peer))

    def _recv_template(self, kind: str, peer: int) -> tuple[torch.dtype, list[int]]:
        key = (kind, peer)
        if key not in self._recv_templates or self.dynamic_shape:
            meta = torch.zeros(_META_LEN, dtype=torch.int64)
            dist.recv(meta, self._peer_rank(peer))
            ndim = int(meta[1])
            self._recv_templates[key] = (self.ID_TO_DTYPE[int(meta[0])], meta[2:2 + ndim].tolist())
        return self._recv_templates[key]

    def _exec_send_activation_to(self, buffer_id, micro_batch, peer):
        outputs = self.pipe_buffers["outputs"][buffer_id]
        self._send_meta_once("act", outputs, peer)
        dist.send(outputs.detach().contiguous(), self._peer_rank(peer))

    def _exec_recv_activation_from(self, buffer_id, micro_batch, peer):
        dtype, shape = self._recv_template("act", peer)
        buf = torch.empty(shape, dtype=dtype, device=self.device)  # own buffer per micro-batch
        dist.recv(buf, self._peer_rank(peer))
        buf.requires_grad = buf.is_floating_point()
        self.pipe_buffers["inputs"][buffer_id] = buf

    def _exec_send_grad_to(self, buffer_id, micro_batch, peer):
        inputs = self.pipe_buffers["inputs"][buffer_id]
        dist.send(inputs.grad.contiguous(), self._peer_rank(peer))
        self.pipe_buffers["inputs"][buffer_id] = None

    def _exec_recv_grad_from(self, buffer_id, micro_batch, peer):
        outputs = self.pipe_buffers["outputs"][buffer_id]
        grad = torch.empty_like(outputs, memory_format=torch.contiguous_format)  # never shared with activations
        dist.recv(grad, self._peer_rank(peer))
        self._routed_grads[buffer_id] = grad

    def _aggregate_total_loss(self):
        if not self.routed:
            return super()._aggregate_total_loss()
        # Under the out-of-order schedule two stages compute losses: sum them over the pipeline.
        local = self.total_loss if self.total_loss is not None else torch.zeros((), device=self.device)
        total = local.detach().clone().float().reshape(1)
        dist.all_reduce(total, group=self.grid.get_pipe_parallel_group())
        loss = (total / self.micro_batches).reshape(())
        self.dp_group_loss = loss.clone()
        if self.is_data_parallel:
            dist.all_reduce(loss, group=self.mpu.get_data_parallel_group())
            loss /= self.dp_world_size
        self.agg_additional_losses = None
        return loss

    _INSTRUCTION_MAP = {
        **PipelineEngine._INSTRUCTION_MAP,
        ds_schedule.OptimizerStep: _exec_optimizer_step,
        ds_schedule.ReduceTiedGrads: _exec_reduce_tied_grads,
        cf_schedule.LoadRoutedMicroBatch: _exec_load_routed,
        cf_schedule.ForwardRouted: _exec_forward_routed,
        cf_schedule.BackwardRouted: _exec_backward_routed,
        cf_schedule.SendActivationTo: _exec_send_activation_to,
        cf_schedule.RecvActivationFrom: _exec_recv_activation_from,
        cf_schedule.SendGradTo: _exec_send_grad_to,
        cf_schedule.RecvGradFrom: _exec_recv_grad_from,
    }
