"""Reading and writing one stage's weights, optimizer state and recovery state, for recovery.

A mixin of ``CheckFreePipelineEngine`` (it uses the engine's module, optimizer, grid and
``stage_state``), apart from it because it is one concern: what a stage *holds*, which
recovery reads, replaces and carries, as opposed to how the engine trains. Under bf16
DeepSpeed's BF16_Optimizer keeps fp32 master weights beside the bf16 parameters (split over
data-parallel replicas when there are several), so every operation here reads and writes
the masters too; a bf16 copy of a weight would lose the masters' low bits.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param


def _master_share(param):
    """This replica's share of ``param``'s fp32 master under DeepSpeed's BF16_Optimizer (None:
    the whole master lives on other replicas). Private: ``ds_private.MEMBERS`` lists ``_hp_mapping``,
    which BF16_Optimizer sets on every parameter it steps (None where the share is elsewhere)."""
    mapping = param._hp_mapping
    return None if mapping is None else mapping.get_hp_fragment()


class StageWeightsMixin:
    """The stage's weights, masters, moments and recovery state: wipe, rebuild, copy, carry."""

    def reset_optimizer_state(self) -> None:
        """Drop Adam moments and step counts of this rank: a fresh node starts from nothing."""
        self._base_optimizer().state.clear()

    @property
    def has_fp32_masters(self) -> bool:
        """bf16 training: the optimizer steps fp32 masters and copies them into bf16 parameters."""
        return bool(self.bfloat16_enabled())

    @property
    def masters_partitioned(self) -> bool:
        """bf16 with data-parallel replicas: each replica's BF16_Optimizer holds only its share of
        the fp32 masters (and of the moments); reading a whole master is a collective of the
        stage's data-parallel group, and a lost replica's share exists nowhere else."""
        return self.has_fp32_masters and self.grid.get_data_parallel_world_size() > 1

    def replica_weights(self) -> "OrderedDict[str, torch.Tensor]":
        """What a live replica sends a lost twin: ``recovery_weights``, except with partitioned
        masters, where the whole masters cannot be read without the lost twin: then the bf16
        weights (identical on every replica) in fp32, from which the twin rebuilds its share."""
        if not self.masters_partitioned:
            return self.recovery_weights(include_replicated=True)
        state = self.module.recovery_state(include_replicated=True)
        return OrderedDict((k, p.detach().float()) for k, p in state.items())

    def recovery_weights(self, include_replicated: bool) -> "OrderedDict[str, torch.Tensor]":
        """What recovery sends from this stage: the fp32 masters under bf16 (a bf16 copy would
        lose their low bits), else the fp32 parameters themselves."""
        state = self.module.recovery_state(include_replicated=include_replicated)
        if not self.has_fp32_masters:
            return state
        return OrderedDict((k, safe_get_full_fp32_param(p)) for k, p in state.items())

    def _write_weights(self, pairs) -> None:
        """Set parameters (and, under bf16, their fp32 masters) from fp32 ``(param, value)`` pairs:
        the master gets the fp32 value, the parameter its cast, so the two stay consistent."""
        with torch.no_grad():
            for param, value in pairs:
                param.copy_(value.to(device=param.device, dtype=param.dtype))
                param.grad = None
                if self.has_fp32_masters:
                    safe_set_full_fp32_param(param, value.to(device=param.device, dtype=torch.float32))

    def wipe_stage(self, seed: int) -> None:
        """Logical failure: destroy everything this rank held for its stage.

        Parameters (and fp32 masters) are overwritten with fresh random values (a replacement
        node has not seen the old weights), gradients and optimizer state are dropped, and the
        learning-rate multiplier returns to 1 until recovery sets it."""
        gen = torch.Generator().manual_seed(seed)
        self._write_weights([(p, torch.randn(p.shape, generator=gen, dtype=torch.float32))
                             for p in self.module.parameters()])
        self.reset_optimizer_state()
        self.stage_state.reset()

    def install_recovered(self, weights: dict, lr_scale: float, include_replicated: bool) -> None:
        """A rebuilt stage: these (fp32) weights, fresh optimizer state, the learning-rate factor
        (set, not multiplied: a second failure does not compound)."""
        template = self.module.recovery_state(include_replicated=include_replicated)
        self._write_weights([(param, weights[key]) for key, param in template.items()])
        self.reset_optimizer_state()
        self.stage_state.rebuilt(lr_scale)

    def reset_lr_scale(self) -> None:
        """After a rollback or an exact restore nothing needs compensating."""
        self.stage_state.clear_lr_scale()

    def _base_optimizer(self):
        """The optimizer that holds the moments (under bf16, the one BF16_Optimizer wraps)."""
        return self.optimizer.optimizer if self.has_fp32_masters else self.optimizer

    def replica_state(self) -> dict:
        """What a lost data-parallel replica copies from its live twin besides the weights (not
        the moments when the masters are partitioned: the twin's are for its own share)."""
        optimizer = None if self.masters_partitioned else self._base_optimizer().state_dict()
        return {"optimizer": optimizer, "stage_state": self.stage_state.snapshot()}

    def install_replica(self, weights: dict, state: dict) -> None:
        """Become an exact copy of a live replica of this stage (weights as ``replica_weights``
        gives them, optimizer and recovery state as ``replica_state`` does); no lr change.
        With partitioned masters the twin's moments are for its own share, not this one's: this
        replica's share of the masters is its bf16 weights in fp32 and its moments start fresh."""
        template = self.module.recovery_state(include_replicated=True)
        self._write_weights([(param, weights[key]) for key, param in template.items()])
        if self.masters_partitioned:
            self.reset_optimizer_state()
        else:
            self._base_optimizer().load_state_dict(state["optimizer"])
        self.stage_state.load(state["stage_state"])

    def training_state(self) -> dict:
        """A copy of this rank's whole stage in memory, to carry into a rebuilt engine
        (under bf16 with the fp32 masters and the wrapped optimizer's moments)."""
        masters = shares = None
        if self.masters_partitioned:  # only this replica's share: reading the rest is a collective,
            # which would wait on a dead replica; the rebuilt engine splits the masters the same way
            shares = {k: _master_share(p).clone() for k, p in self.module.named_parameters()
                      if _master_share(p) is not None}
        elif self.has_fp32_masters:
            masters = {k: safe_get_full_fp32_param(p).detach().clone() for k, p in self.module.named_parameters()}
        return {"module": {k: v.detach().clone() for k, v in self.module.state_dict().items()},
                "optimizer": copy.deepcopy(self._base_optimizer().state_dict()), "fp32_masters": masters,
                "fp32_master_shares": shares,
                "stage_state": self.stage_state.snapshot(),
                "global_steps": self.global_steps, "global_samples": self.global_samples}

    def load_training_state(self, snap: dict) -> None:
        self.module.load_state_dict(snap["module"])
        if snap.get("fp32_masters") is not None:
            named = dict(self.module.named_parameters())
            self._write_weights([(named[k], v) for k, v in snap["fp32_masters"].items()])
        if snap.get("fp32_master_shares") is not None:
            named = dict(self.module.named_parameters())
            with torch.no_grad():
                for k, share in snap["fp32_master_shares"].items():
                    _master_share(named[k]).copy_(share)
        self._base_optimizer().load_state_dict(snap["optimizer"])
        self.stage_state.load(snap["stage_state"])
        self.global_steps, self.global_samples = snap["global_steps"], snap["global_samples"]
