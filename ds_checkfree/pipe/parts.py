"""A model as CheckFree sees it: a head, a run of repeated blocks, a tail.

DeepSpeed describes a pipeline model as a flat list of ``LayerSpec``s. CheckFree needs one
more piece of structure: which run of layers is the repeated block stack (a lost stage is
rebuilt by averaging its neighbours' blocks key by key) and which layers are the head
(embedding, ...) and the tail (final norm, LM head), which CheckFree+ replicates on the
neighbouring stage. ``PipelineParts`` carries that split; ``check_parts`` refuses, before
any process group, a model recovery could not handle, naming the offending layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from deepspeed.runtime.pipe.module import LayerSpec, TiedLayerSpec
from torch import nn

from ds_checkfree.config.checkfree import ConfigError


@dataclass
class PipelineParts:
    """A pipeline model in DeepSpeed's own terms, split the way CheckFree needs.

    ``head`` / ``blocks`` / ``tail``: ``LayerSpec`` (or ``TiedLayerSpec``) lists; DeepSpeed
    builds only the local stage's specs, so a layer class that loads its own weights reads only
    its own. The first head layer receives the micro-batch inputs, each layer's output feeds the
    next, ``loss_fn(outputs, labels)`` ends it: DeepSpeed's contract. ``blocks`` must be of one
    class with identical parameter names and shapes (what CheckFree averages)."""
    head: list
    blocks: list
    tail: list
    loss_fn: Callable
    #: shown in logs and run.json
    name: str = "user model"
    #: std of the normal re-initialisation a "random" recovery (an ablation) draws
    init_std: float = 0.02
    #: the source's own facts, when known (``max_seq_len``, ``vocab_size``, ``num_parameters``)
    info: dict = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


class SeededLayerSpec(LayerSpec):
    """A LayerSpec that builds under a fixed seed: the same weights whichever stage builds it
    (so any stage can be rebuilt bit-identically by a single-process reference)."""

    def __init__(self, seed, typename, *args, **kwargs):
        super().__init__(typename, *args, **kwargs)
        self.seed = seed

    def build(self, log=False):
        with torch.random.fork_rng(devices=[]):
            seed_layer_build(self.seed)
            return super().build(log)


def seed_layer_build(seed: int) -> None:
    """Seed a layer's construction. DeepSpeed builds layers on the CPU, so the CPU generator is
    the one that matters; ``torch.manual_seed`` with CUDA not (yet) initialised would also
    queue a CUDA seed call holding a captured stack (~6 ms each on a busy core, per layer and
    per rebuild, and kept for the process's life). With CUDA initialised it is seeded too, as
    before (a layer that allocates on the GPU itself draws from it)."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


class ReplicatedSpec(TiedLayerSpec):
    """A head/tail layer that CheckFree+ places on two stages, kept identical by DeepSpeed's
    tied-layer mechanism (gradients reduced over the owners, weights broadcast at start). Wraps
    the user's spec; every parameter is tied, named after the build."""

    def __init__(self, key: str, inner: LayerSpec):
        super().__init__(key, inner.typename, *inner.module_args, tied_weight_attr=[], **inner.module_kwargs)
        self.inner = inner

    def build(self, log=False):
        module = self.inner.build(log)
        # DeepSpeed reads tied_weight_attr only after building, on the ranks that own the layer
        self.tied_weight_attr = [name for name, _ in module.named_parameters()]
        return module


def _where(part: str, index: int, spec) -> str:
    name = getattr(spec, "typename", type(spec))
    return f"{part}[{index}] ({getattr(name, '__name__', name)})"


def _shapes(spec) -> dict[str, tuple] | None:
    """Parameter name -> shape, built on the meta device (no memory, no weights read);
    None when the layer class cannot be built there."""
    try:
        with torch.device("meta"):
            module = spec.build()
    except Exception:  # noqa: BLE001 - a class that cannot build on meta is checked after its real build
        return None
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


def check_parts(parts: PipelineParts) -> None:
    """Refuse what recovery could not handle, one line naming the layer and the fix."""
    fix = "Fix: pass DeepSpeed LayerSpec/TiedLayerSpec entries (deepspeed.pipe.LayerSpec(cls, *args))."
    for part in ("head", "blocks", "tail"):
        layers = getattr(parts, part)
        if not isinstance(layers, (list, tuple)):
            raise ConfigError(f"PipelineParts.{part} must be a list of LayerSpec, got {type(layers).__name__}. {fix}")
        for i, spec in enumerate(layers):
            if not isinstance(spec, LayerSpec):
                raise ConfigError(f"{_where(part, i, spec)} is not a LayerSpec: recovery rebuilds and replicates "
                                  f"layers from their specs. {fix}")
    if not parts.head or not parts.tail:
        raise ConfigError("PipelineParts needs at least one head layer (embedding) and one tail layer (LM head). "
                          "Fix: move the first/last layer of your list into head/tail.")
    if not parts.blocks:
        raise ConfigError("PipelineParts.blocks is empty: CheckFree rebuilds a stage from its neighbours' blocks. "
                          "Fix: put the repeated transformer blocks in blocks.")
    if not callable(parts.loss_fn):
        raise ConfigError(f"PipelineParts.loss_fn must be callable(outputs, labels), got {parts.loss_fn!r}.")
    first = parts.blocks[0]
    for i, spec in enumerate(parts.blocks[1:], start=1):
        if isinstance(spec, TiedLayerSpec):
            raise ConfigError(f"{_where('blocks', i, spec)} is a TiedLayerSpec: a block is averaged from its "
                              "neighbours, it cannot also be tied. Fix: tie only head/tail layers.")
        if spec.typename is not first.typename:
            raise ConfigError(f"{_where('blocks', i, spec)} differs in class from {_where('blocks', 0, first)}: "
                              "CheckFree averages neighbouring blocks key by key. Fix: give every block one class, "
                              "or move the odd layer to head/tail.")
    check_block_shapes(parts.blocks)


def check_block_shapes(blocks: list) -> None:
    """Every block has the parameter names and shapes of block 0 (built on the meta device)."""
    ref = _shapes(blocks[0])
    if ref is None:
        return
    for i, spec in enumerate(blocks[1:], start=1):
        got = _shapes(spec)
        if got is None or got == ref:
            continue
        where = _where("blocks", i, spec)
        missing, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
        if missing or extra:
            raise ConfigError(f"{where} has parameters {extra or []} / lacks {missing or []} compared with blocks[0]: "
                              "CheckFree averages neighbouring blocks key by key. Fix: build every block the same way.")
        name = next(k for k in ref if ref[k] != got[k])
        raise ConfigError(f"{where} parameter {name!r} has shape {got[name]} but blocks[0] has {ref[name]}: CheckFree "
                          "averages neighbouring blocks key by key. Fix: give every block the same shapes.")


def block_parameter_count(blocks: list) -> int | None:
    """Parameters of one block (meta build), or None when it cannot be built there."""
    shapes = _shapes(blocks[0])
    if shapes is None:
        return None
    return sum(int(torch.Size(s).numel()) for s in shapes.values())


def as_modules(specs: list) -> list[nn.Module]:
    """Build specs in this process (single-process references, tests)."""
    return [spec.build() for spec in specs]
