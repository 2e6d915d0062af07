"""CheckFreePipelineModule: a DeepSpeed PipelineModule that knows its stage layout.

It takes a model in DeepSpeed's own terms, split by ``PipelineParts`` into head, repeated
blocks and tail (``pipe.parts``; the built-in LLaMA is one user of it). Beyond stock DeepSpeed
it (1) partitions by the CheckFree layout (head on stage 0, blocks evenly over the block stages,
tail on the last) instead of a heuristic, (2) keeps a role per local layer so the engine can
run the swapped order of CheckFree+ (whose head/tail replicas it builds as tied layers), and
(3) exposes the state that recovery moves between stages under stage-independent names
(``decoder.<local block>.<param>``, ``embed.<k>.<param>``, ``head.<k>.<param>``).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from deepspeed import comm as dist
from deepspeed.runtime.pipe.module import PipelineModule, TiedLayerSpec
from torch import nn

from ds_checkfree.config import layout as L
from ds_checkfree.config.checkfree import ConfigError
from ds_checkfree.pipe.parts import PipelineParts, ReplicatedSpec, check_parts

_PARTITION_METHOD = "checkfree_layout"


class CheckFreePipelineModule(PipelineModule):
    """PipelineModule over a head / blocks / tail model with the CheckFree stage layout."""

    def __init__(self, parts: PipelineParts, num_stages: int | None = None, mode: str = "checkfree",
                 topology=None, activation_checkpoint_interval: int = 0, layout: str = "all_stages_fail",
                 checked: bool = False):
        """``checked``: ``check_parts`` already ran (``initialize.prepare``), skip it."""
        if not checked:
            check_parts(parts)
        stages = topology.get_dim("pipe") if topology is not None else num_stages
        try:
            slots = L.stage_slots(parts.num_blocks, stages, mode, layout, len(parts.head), len(parts.tail))
        except ValueError as err:
            raise ConfigError(f"{parts.name}: {err}. Fix: choose a number of blocks divisible by the block stages, "
                              "or another number of stages.") from None
        replicated = mode == "checkfree_plus"
        by_role = {L.EMBED: ("embed", parts.head), L.EMBED_REPLICA: ("embed", parts.head),
                   L.DECODER: (None, parts.blocks), L.HEAD: ("head", parts.tail), L.HEAD_REPLICA: ("head", parts.tail)}
        tied = {}

        def spec_for(slot):
            key, layers = by_role[slot.role]
            spec = layers[slot.index]
            if key is None or not replicated or isinstance(spec, TiedLayerSpec):
                return spec  # a user's TiedLayerSpec keeps its own key: its replica is tied by it
            return tied.setdefault((key, slot.index), ReplicatedSpec(f"cf_{key}_{slot.index}", spec))

        specs = [spec_for(slot) for stage in slots for slot in stage]
        # Set before PipelineModule.__init__, which calls _partition_layers.
        object.__setattr__(self, "_cf_slots", slots)
        object.__setattr__(self, "_cf_mode", mode)
        object.__setattr__(self, "_cf_layout", layout)
        super().__init__(layers=specs, num_stages=None if topology else num_stages, topology=topology,
                         loss_fn=parts.loss_fn, partition_method=_PARTITION_METHOD,
                         activation_checkpoint_interval=activation_checkpoint_interval)
        #: the head / blocks / tail description (``self.parts`` is DeepSpeed's partition bounds)
        self.model_parts = parts
        #: std of a "random" recovery's re-initialisation (an ablation)
        self.init_std = parts.init_std
        self.local_slots: list[L.Slot] = slots[self.stage_id]
        self._skip_roles = L.SKIP_NORMAL if replicated else frozenset()

    def spec_for(self, slot: L.Slot):
        """The (unreplicated) spec a slot is built from: the redundant baseline builds its shadow
        of the successor stage from it."""
        p = self.model_parts
        part = {L.EMBED: p.head, L.EMBED_REPLICA: p.head, L.DECODER: p.blocks, L.HEAD: p.tail,
                L.HEAD_REPLICA: p.tail}[slot.role]
        return part[slot.index]

    #: the elastic launch: tied gradients travel over p2p on the default group
    tied_gradients_point_to_point = False

    def route_collectives_over_world(self) -> None:
        """Elastic launch: the tied (de)embedding gradients of CheckFree+ travel point-to-point
        on the default group.

        A survivor unblocks a peer waiting on it by leaving its data plane (gloo: closing its
        sockets), but a DeepSpeed subgroup stays open as long as anything references it, and the pipeline's autograd
        hooks keep the old engine (and its groups) alive after a failure. So blocking
        collectives stay on the default group: with one replica the pipe group already is
        the default group (``ds_private.one_group_per_member_set``, around the whole
        elastic build), and the tied gradients are exchanged here by send/recv on it. With
        data-parallel replicas the pipe and data groups stay DeepSpeed's: a member blocked on
        one is woken by the coordinator's round, which wakes the whole data plane (gloo: every
        socket shut down; NCCL: every group aborted; ``data_plane``)."""
        self.tied_gradients_point_to_point = True

    def allreduce_tied_weight_gradients(self):
        if not self.tied_gradients_point_to_point:
            return super().allreduce_tied_weight_gradients()
        me = dist.get_rank()
        for key, comm in self.tied_comms.items():
            ranks = sorted(comm["ranks"])
            for attr in comm["weight_attr"]:
                grad = self._recursive_getattr(self.tied_modules[key], attr).grad
                parts = {me: grad.detach().clone()}
                for peer in ranks:  # every pair exchanges; the lower rank sends first
                    if peer == me:
                        continue
                    buf = torch.empty_like(grad)
                    if me < peer:
                        dist.send(parts[me], peer)
                        dist.recv(buf, peer)
                    else:
                        dist.recv(buf, peer)
                        dist.send(parts[me], peer)
                    parts[peer] = buf
                total = parts[ranks[0]].clone()
                for r in ranks[1:]:  # the same order everywhere: replicas stay bit-identical
                    total += parts[r]
                grad.copy_(total)

    def _synchronize_tied_weights(self):
        # DeepSpeed broadcasts into parameters that require grad; outside no_grad autograd
        # records the in-place broadcast and later backprops through it.
        with torch.no_grad():
            super()._synchronize_tied_weights()

    # -- layout ---------------------------------------------------------------------------
    def _partition_layers(self, method="uniform"):
        if method != _PARTITION_METHOD:
            return super()._partition_layers(method)
        self.parts = L.partition_bounds(self._cf_slots)
        stage_id = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    @property
    def mode(self) -> str:
        return self._cf_mode

    @property
    def layout(self) -> str:
        """``checkfree.layout``: where the (de)embedding sits and which stages may fail."""
        return self._cf_layout

    @property
    def slots(self) -> list[list[L.Slot]]:
        """The stage -> layer map of the whole pipeline."""
        return self._cf_slots

    def neighbours(self, stage: int | None = None) -> tuple[int | None, int | None]:
        return L.neighbours(self.stage_id if stage is None else stage, self.num_stages)

    # -- forward with the CheckFree+ order --------------------------------------------------
    def set_order(self, swapped: bool) -> None:
        """Choose which replicated layers run: the engine calls this before each forward."""
        if self._cf_mode == "checkfree_plus":
            self._skip_roles = L.SKIP_SWAPPED if swapped else L.SKIP_NORMAL

    def forward(self, forward_input):
        if not self._skip_roles:
            return super().forward(forward_input)
        x = forward_input
        for func, slot in zip(self.forward_funcs, self.local_slots):
            if slot.role not in self._skip_roles:
                x = func(x)
        return x

    # -- state moved by recovery ------------------------------------------------------------
    def _local_modules(self) -> list[tuple[str, nn.Module]]:
        """(stage-independent prefix, module) for every distinct local layer."""
        out, seen, j = [], set(), 0
        for func, slot in zip(self.forward_funcs, self.local_slots):
            module = func if isinstance(func, nn.Module) else func.args[0]
            if id(module) in seen:
                continue
            seen.add(id(module))
            if slot.role == L.DECODER:
                out.append((f"decoder.{j}", module))
                j += 1
            elif slot.role in (L.EMBED, L.EMBED_REPLICA):
                out.append((f"embed.{slot.index}", module))
            else:
                out.append((f"head.{slot.index}", module))
        return out

    def recovery_state(self, include_replicated: bool) -> "OrderedDict[str, torch.Tensor]":
        """Parameters under stage-independent names: decoders always, (de)embeddings if asked."""
        state = OrderedDict()
        for prefix, module in self._local_modules():
            if prefix.startswith("decoder") or include_replicated:
                for name, p in module.named_parameters():
                    state[f"{prefix}.{name}"] = p
        return state

    def owned_layers(self) -> list[tuple[str, int, nn.Module]]:
        """(part, index, module) of the layers this stage owns, CheckFree+ replicas left out:
        what an export writes (``part``: "head", "block" or "tail"; a block's index is global)."""
        part = {L.EMBED: "head", L.DECODER: "block", L.HEAD: "tail"}
        out = []
        for func, slot in zip(self.forward_funcs, self.local_slots):
            if slot.role in part:
                out.append((part[slot.role], slot.index, func if isinstance(func, nn.Module) else func.args[0]))
        return out
