"""CheckFreePipelineModule: a DeepSpeed PipelineModule that knows its stage layout.

Beyond stock DeepSpeed it (1) partitions by our explicit layout instead of a heuristic,
(2) keeps a role per local layer so the engine can run the swapped order of CheckFree+,
(3) builds every layer from its own seed so that any stage can be rebuilt bit-identically
by a single-process reference, and (4) exposes the state that recovery moves between
stages under stage-independent names (``decoder.<local index>.<param>``).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from deepspeed import comm as dist
from deepspeed.runtime.pipe.module import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn

from ds_checkfree.config import layout as L
from ds_checkfree.models import DecoderLayerPipe, EmbeddingPipe, ModelConfig, NormHeadPipe, lm_loss

_PARTITION_METHOD = "checkfree_layout"


def layer_seed(base_seed: int, slot: L.Slot, num_layers: int) -> int:
    """Seed of one layer: a function of the layer, not of the stage it lands on."""
    if slot.role in (L.EMBED, L.EMBED_REPLICA):
        return base_seed * 10007 + 0
    if slot.role in (L.HEAD, L.HEAD_REPLICA):
        return base_seed * 10007 + num_layers + 1
    return base_seed * 10007 + slot.decoder + 1


def _build_seeded(build, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class SeededLayerSpec(LayerSpec):
    """LayerSpec that builds under a fixed seed (same weights whichever stage builds it)."""

    def __init__(self, seed, typename, *args, **kwargs):
        super().__init__(typename, *args, **kwargs)
        self.seed = seed

    def build(self, log=False):
        return _build_seeded(lambda: super(SeededLayerSpec, self).build(log), self.seed)


class SeededTiedLayerSpec(TiedLayerSpec):
    """TiedLayerSpec (a replicated layer kept identical by DeepSpeed) with a fixed seed."""

    def __init__(self, seed, key, typename, *args, **kwargs):
        super().__init__(key, typename, *args, **kwargs)
        self.seed = seed

    def build(self, log=False):
        return _build_seeded(lambda: super(SeededTiedLayerSpec, self).build(log), self.seed)


def _param_names(module_cls, cfg) -> list[str]:
    with torch.device("meta"):
        return [name for name, _ in module_cls(cfg).named_parameters()]


def make_spec(slot: L.Slot, cfg: ModelConfig, base_seed: int, replicated: bool) -> LayerSpec:
    """The DeepSpeed layer spec for one slot; replicated (de)embeddings become tied specs."""
    seed = layer_seed(base_seed, slot, cfg.num_layers)
    if slot.role == L.DECODER:
        return SeededLayerSpec(seed, DecoderLayerPipe, cfg, slot.decoder)
    cls, key = (EmbeddingPipe, "embed") if slot.role in (L.EMBED, L.EMBED_REPLICA) else (NormHeadPipe, "head")
    if replicated:
        return SeededTiedLayerSpec(seed, key, cls, cfg, tied_weight_attr=_param_names(cls, cfg))
    return SeededLayerSpec(seed, cls, cfg)


def build_reference(cfg: ModelConfig, base_seed: int) -> nn.Sequential:
    """Single-process model with exactly the weights the pipeline builds (for equivalence tests)."""
    layers = [_build_seeded(lambda: EmbeddingPipe(cfg), layer_seed(base_seed, L.Slot(L.EMBED), cfg.num_layers))]
    for i in range(cfg.num_layers):
        slot = L.Slot(L.DECODER, i)
        layers.append(_build_seeded(lambda: DecoderLayerPipe(cfg, i), layer_seed(base_seed, slot, cfg.num_layers)))
    layers.append(_build_seeded(lambda: NormHeadPipe(cfg), layer_seed(base_seed, L.Slot(L.HEAD), cfg.num_layers)))
    return nn.Sequential(*layers)


class CheckFreePipelineModule(PipelineModule):
    """PipelineModule over the LLaMA layers with the CheckFree stage layout."""

    def __init__(self, model_config: ModelConfig, num_stages: int, mode: str = "checkfree", base_seed: int = 1234,
                 topology=None, activation_checkpoint_interval: int = 0, layout: str = "all_stages_fail"):
        slots = L.stage_slots(model_config.num_layers, num_stages, mode, layout)
        replicated = mode == "checkfree_plus"
        specs = [make_spec(slot, model_config, base_seed, replicated) for stage in slots for slot in stage]
        # Set before PipelineModule.__init__, which calls _partition_layers.
        object.__setattr__(self, "_cf_slots", slots)
        object.__setattr__(self, "_cf_mode", mode)
        object.__setattr__(self, "_cf_layout", layout)
        super().__init__(layers=specs, num_stages=None if topology else num_stages, topology=topology, loss_fn=lm_loss,
                         partition_method=_PARTITION_METHOD, activation_checkpoint_interval=activation_checkpoint_interval)
        self.model_config = model_config
        self.base_seed = base_seed
        self.local_slots: list[L.Slot] = slots[self.stage_id]
        self._skip_roles = L.SKIP_NORMAL if replicated else frozenset()

    #: the elastic launch: tied gradients travel over p2p on the default group
    tied_gradients_point_to_point = False

    def route_collectives_over_world(self) -> None:
        """Elastic launch: the tied (de)embedding gradients of CheckFree+ travel point-to-point
        on the default group.

        A survivor unblocks a peer waiting on it by leaving its data plane (gloo: closing its
        sockets), but a DeepSpeed subgroup stays open as long as anything references it, and the pipeline's autograd
        hooks keep the old engine (and its groups) alive after a failure. So blocking
        collectives stay on the default group: with one replica the pipe group already is
        the default group (``ds_private.world_sized_groups_are_default``, around the whole
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
                out.append(("embed", module))
            else:
                out.append(("head", module))
        return out

    def recovery_state(self, include_replicated: bool) -> "OrderedDict[str, torch.Tensor]":
        """Parameters under stage-independent names: decoders always, (de)embeddings if asked."""
        state = OrderedDict()
        for prefix, module in self._local_modules():
            if prefix.startswith("decoder") or include_replicated:
                for name, p in module.named_parameters():
                    state[f"{prefix}.{name}"] = p
        return state
