"""CheckFreePipelineEngine: DeepSpeed's PipelineEngine plus CheckFree's hooks.

Kept thin on purpose. It adds
  * the schedule hook: DeepSpeed's ``TrainSchedule`` for CheckFree, the out-of-order
    schedule (``ds_checkfree.pipe.schedule``) for CheckFree+, executed by routed instructions
    that talk to any stage, not only stage +- 1;
  * the stage's recovery state (``StageRecoveryState``: the last step's gradient norms
    before and after clipping, the learning-rate multiplier a rebuilt stage keeps), measured
    at the optimizer step; the operations that read and write a stage's weights (wipe,
    install recovered weights, copy a replica, carry into a rebuilt engine) come from
    ``ds_checkfree.pipe.stage_weights``. Recovery plans are applied by ``ds_checkfree.recovery.apply``.
Everything else is DeepSpeed's own code path.
"""
from __future__ import annotations

import math

import torch
from deepspeed import comm as dist
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe import schedule as ds_schedule
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.utils import clip_grad_norm_

from ds_checkfree.pipe import schedule as cf_schedule
from ds_checkfree.pipe.devices import comm_device, comm_empty, comm_tensor
from ds_checkfree.config.checkfree import CheckFreeConfig
from ds_checkfree.pipe.stage_state import StageRecoveryState
from ds_checkfree.pipe.stage_weights import StageWeightsMixin

_META_LEN = 10  # dtype id, ndim, up to 8 dims


def _squared_grad_norms(decoder, rest) -> tuple[float, float]:
    """Squared gradient norms (decoder layers, whole stage) of two lists of gradients (None:
    no gradient): one fused per-tensor norm pass (``torch._foreach_norm``) on the gradients'
    device, and one host sync for both."""
    dec = [g.detach() for g in decoder if g is not None]
    grads = dec + [g.detach() for g in rest if g is not None]
    if not grads:
        return 0.0, 0.0
    sq = torch.stack(torch._foreach_norm(grads)).double().pow(2)
    decoder_sq, stage_sq = torch.stack([sq[:len(dec)].sum(), sq.sum()]).tolist()
    return decoder_sq, stage_sq


class CheckFreePipelineEngine(StageWeightsMixin, PipelineEngine):
    """PipelineEngine with the CheckFree schedule, gradient-norm record and recovery hooks."""

    def __init__(self, *args, checkfree_config: CheckFreeConfig, abort_check=None, rebuilt: bool = False, **kwargs):
        """``abort_check()``: raises when the data plane was aborted under this step (the elastic
        runtime passes its own; the engine does not know who aborts it). ``rebuilt``: this engine
        replaces one lost in a recovery, and every parameter is overwritten right after (a
        survivor's kept stage, a replacement's re-materialised one): DeepSpeed's start-up
        broadcast of replica 0's weights would be sent only to be overwritten."""
        self._skip_start_broadcast = rebuilt
        super().__init__(*args, **kwargs)
        self.checkfree = checkfree_config
        self._abort_check = abort_check or (lambda: None)
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
        self._norm_split: tuple[list, list] | None = None
        self._norm_fp32_grads: tuple[list, list] | None = None

    def _broadcast_model(self):
        if not self._skip_start_broadcast:
            super()._broadcast_model()

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

    def _norm_params(self) -> tuple[list, list]:
        """(decoder parameters, the stage's other parameters); recovery and wipes copy into
        parameters in place, so the split holds for the module's lifetime."""
        if self._norm_split is None:
            decoder = list(self.module.recovery_state(include_replicated=False).values())
            ids = {id(p) for p in decoder}
            self._norm_split = (decoder, [p for p in self.module.parameters() if id(p) not in ids])
        return self._norm_split

    def _norm_grads(self) -> tuple[list, list]:
        """The gradients the step applies, split as ``_norm_params``. Under bf16 these are the
        optimizer's fp32 gradients: DeepSpeed's pipeline clears the bf16 parameters' own ones
        before every micro-batch (they end holding the last micro-batch's alone) and averages
        only the fp32 ones over data-parallel replicas, so every replica computes the same
        norms and a rebuilt stage's replicas the same average."""
        decoder, rest = self._norm_params()
        if not self.has_fp32_masters:
            return [p.grad for p in decoder], [p.grad for p in rest]
        if self._norm_fp32_grads is None:  # views into the optimizer's flat fp32 gradient buffer,
            # allocated once with the optimizer and only zeroed or written in place afterwards
            fp32 = {}
            for group, grads in zip(self.optimizer.bf16_groups, self.optimizer.fp32_groups_gradients):
                fp32.update((id(p), g) for p, g in zip(group, grads))
            self._norm_fp32_grads = ([fp32.get(id(p)) for p in decoder], [fp32.get(id(p)) for p in rest])
        return self._norm_fp32_grads

    # ------------------------------------------------------------------ optimizer step
    def _exec_optimizer_step(self, lr_kwargs=None):
        decoder_sq, stage_sq = _squared_grad_norms(*self._norm_grads())
        # after that host sync: an NCCL receive cut short by a round's abort raised nothing
        self._abort_check()
        self.stage_state.record_pre_clip(stage_sq, decoder_sq)  # clipping scales them later
        groups = self.optimizer.param_groups
        if self.lr_scale != 1.0:
            for g in groups:
                g["lr"] *= self.lr_scale
        try:
            PipelineEngine._exec_optimizer_step(self, lr_kwargs)
            if self.has_fp32_masters:
                self._record_bf16_clip_factor()
        finally:
            # A DeepSpeed scheduler rewrites lr from its own formula after the step; without one,
            # undo the multiplier so it never compounds.
            if self.lr_scale != 1.0 and self.lr_scheduler is None:
                for g in groups:
                    g["lr"] /= self.lr_scale
        # every stage's norms reach the others on the step's loss all-reduce (_aggregate_total_loss)

    def _record_bf16_clip_factor(self) -> None:
        """DeepSpeed's bf16 optimizer clips inside its own step (``clip_fp32_gradients`` is not
        called): it multiplies the fp32 gradients by ``min(1, clip / (norm + 1e-6))`` with the
        global norm it keeps, so the post-clip norms follow from that, as in fp32. A step it
        skipped (an infinite norm) changed nothing: the norms stay pre-clip."""
        clip = float(self.optimizer.clip_grad)  # private members: ds_private.MEMBERS (no silent default)
        norm = float(self.optimizer._global_grad_norm)  # set by every BF16_Optimizer step
        if clip > 0.0 and math.isfinite(norm):
            self.stage_state.record_clip_factor(min(1.0, clip / (norm + 1e-6)))

    def clip_fp32_gradients(self):
        max_norm = self.gradient_clipping()
        if self.checkfree.clip_scope == "stage":
            self._clip_stage_gradients(float(max_norm))
            return
        total = clip_grad_norm_(parameters=self.module.parameters(), max_norm=max_norm, mpu=self.mpu)
        self.global_grad_norm = float(total)
        # DeepSpeed multiplies every gradient by min(1, max_norm / (total + 1e-6)): the
        # post-clip norms follow without another pass over the gradients
        self.stage_state.record_clip_factor(min(1.0, float(max_norm) / (self.global_grad_norm + 1e-6)))

    def _clip_stage_gradients(self, max_norm: float) -> None:
        """``clip_scope: "stage"`` (the reference): this stage clips its own gradient norm, the
        whole-stage norm already measured before the step, with DeepSpeed's coefficient
        ``min(1, max_norm / (norm + 1e-6))``; no collective, and the post-clip norms follow."""
        total = self.stage_state.grad_norm_pre_clip
        factor = min(1.0, max_norm / (total + 1e-6))
        if factor < 1.0:
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, factor)
        self.global_grad_norm = total  # what DeepSpeed would report: here the stage's own norm
        self.stage_state.record_clip_factor(factor)

    def _gather_grad_norms(self):
        mine = comm_tensor(self.stage_state.pair(self.checkfree.norm_scope), torch.float64, self.grid.get_pipe_parallel_group())
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
            if self.using_bf16_optimizer:  # as PipelineEngine._exec_backward_pass: fp32 grads per micro-batch
                self.optimizer.clear_lp_grads()
            self._passing_grad_through = True
            self._running_engine_backward = True
            try:
                outputs.backward(gradient=grad)
            finally:
                self._running_engine_backward = False
                self._passing_grad_through = False
            if self.using_bf16_optimizer and not self._config.bfloat16_config.immediate_grad_update:
                self.optimizer.update_hp_grads(clear_lp_grads=False)
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
        meta = [self.DTYPE_TO_ID[tensor.dtype], tensor.dim(), *tensor.shape]
        dist.send(comm_tensor(meta + [0] * (_META_LEN - len(meta)), torch.int64), self._peer_rank(peer))
        self._meta_sent.add((kind, peer))

    def _recv_template(self, kind: str, peer: int) -> tuple[torch.dtype, list[int]]:
        key = (kind, peer)
        if key not in self._recv_templates or self.dynamic_shape:
            buf = comm_empty(_META_LEN, torch.int64)
            dist.recv(buf, self._peer_rank(peer))
            meta = buf.tolist()
            ndim = int(meta[1])
            self._recv_templates[key] = (self.ID_TO_DTYPE[int(meta[0])], list(meta[2:2 + ndim]))
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
        """The step's loss to every stage, and every stage's gradient norms with it.

        DeepSpeed broadcasts the loss from the last stage. Here each stage first sends its
        (pre-clip, post-clip) norms to the last stage (a gather: one hop), which broadcasts them
        with the loss (one hop, as DeepSpeed's): the metrics' per-stage norms cost one extra
        one-hop message instead of a collective of their own. (A single all-reduce carrying
        both measured ~1.5-2% slower than stock on 4 ranks sharing 2 cores: a ring all-reduce
        is 2(S-1) hops.) Under CheckFree+ two stages compute partial losses, so those are
        summed by one all-reduce. float64 carries the float32 loss exactly."""
        if not self.routed and self.module.get_additional_losses() is not None:
            loss = super()._aggregate_total_loss()  # DeepSpeed's layout for extra losses
            self._gather_grad_norms()
            return loss
        stages = self.num_stages
        group = self.grid.get_pipe_parallel_group()
        device = comm_device(group)
        mine = torch.tensor([float(self.stage_id), *self.stage_state.pair(self.checkfree.norm_scope)],
                            dtype=torch.float64).to(device)
        if self.routed:
            return self._aggregate_routed_loss(mine, group)
        last = self._loss_stage_global_rank()
        slots = torch.zeros(2 + 2 * stages, dtype=torch.float64, device=device)
        agg = None
        if self.is_last_stage():
            norms = [torch.zeros_like(mine) for _ in range(stages)]
            if stages > 1:
                dist.gather(mine, gather_list=norms, dst=last, group=group)
            else:
                norms = [mine]
            for row in norms:  # rows come in group-rank order: place them by the stage they name
                stage = int(row[0])
                slots[2 + 2 * stage:4 + 2 * stage] = row[1:]
            loss = self._scale_loss_by_gas(self.total_loss)
            agg = loss.clone().detach()
            if self.is_data_parallel:  # DeepSpeed's dp average, on the last stage only
                dist.all_reduce(agg, group=self.mpu.get_data_parallel_group())
                agg /= self.dp_world_size
            slots[0:2] = torch.stack([loss.detach().reshape(()), agg.reshape(())])
        else:
            dist.gather(mine, gather_list=None, dst=last, group=group)
        if stages > 1:
            dist.broadcast(slots, src=last, group=group)
        self._read_norm_slots(slots)
        self.agg_additional_losses = None
        self.dp_group_loss = slots[0].float()
        return agg if agg is not None else slots[1].float()

    def _aggregate_routed_loss(self, mine: torch.Tensor, group) -> torch.Tensor:
        """CheckFree+: each loss stage holds a partial sum of micro-batch losses; one SUM
        all-reduce adds them and hands every stage's norms to everyone."""
        stages = self.num_stages
        slots = torch.zeros(2 + 2 * stages, dtype=torch.float64, device=mine.device)
        slots[2 + 2 * self.stage_id:4 + 2 * self.stage_id] = mine[1:]
        if self.total_loss is not None:
            slots[0] = self.total_loss.detach().reshape(())
        if stages > 1:
            dist.all_reduce(slots, group=group)
        self._read_norm_slots(slots)
        self.agg_additional_losses = None
        loss = (slots[0] / self.micro_batches).float()
        self.dp_group_loss = loss.clone()
        if self.is_data_parallel:
            dist.all_reduce(loss, group=self.mpu.get_data_parallel_group())
            loss /= self.dp_world_size
        return loss

    def _read_norm_slots(self, slots: torch.Tensor) -> None:
        values = slots.tolist()
        self.stage_grad_norms = [(values[2 + 2 * s], values[3 + 2 * s]) for s in range(self.num_stages)]

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
