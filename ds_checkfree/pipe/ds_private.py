"""The private DeepSpeed surface ds-checkfree relies on, in one place, and the engine teardown.

DeepSpeed offers no public hook for a custom pipeline schedule, per-stage gradient norms or
tearing an engine down while its peers are gone, so a few private members are used. They
were read from deepspeed ``DEEPSPEED_VERSION``; an upgrade is reviewed here (and
``tests/test_ds_private.py`` fails when one of them disappears).
"""
from __future__ import annotations

import gc
import importlib
from contextlib import contextmanager

DEEPSPEED_VERSION = "0.19.8"

#: "module:Class.member" (or "module:member") -> why we need it
PRIVATE_MEMBERS: dict[str, str] = {
    "deepspeed.runtime.pipe.engine:PipelineEngine._INSTRUCTION_MAP":
        "instruction dispatch by exact type: overridden _exec_* methods need a re-declared map",
    "deepspeed.runtime.pipe.engine:PipelineEngine._train_schedule": "the schedule hook",
    "deepspeed.runtime.pipe.engine:PipelineEngine._exec_optimizer_step": "norms + lr factor around the step",
    "deepspeed.runtime.pipe.engine:PipelineEngine._exec_reduce_tied_grads": "replicas that ran no micro-batch",
    "deepspeed.runtime.pipe.engine:PipelineEngine._aggregate_total_loss": "two loss stages under CheckFree+",
    "deepspeed.runtime.pipe.engine:PipelineEngine._next_batch": "every stage loads under CheckFree+",
    "deepspeed.runtime.engine:DeepSpeedEngine._backward_prologue_per_tensor": "a received gradient is scaled",
    "deepspeed.runtime.pipe.module:PipelineModule._partition_layers": "explicit stage <-> layer map",
    "deepspeed.runtime.pipe.module:PipelineModule._set_bounds": "explicit stage <-> layer map",
    "deepspeed.runtime.pipe.module:PipelineModule._synchronize_tied_weights": "broadcast from a survivor",
    "deepspeed.runtime.pipe.module:PipelineModule._recursive_getattr": "tied weight lookup",
    "deepspeed.runtime.pipe:p2p": "its module globals _grid/_groups hold the old groups",
    "deepspeed.runtime.utils:OutputBackwardHookManager.remove_hooks": "hooks that keep a dropped engine alive",
    "deepspeed.ops:__compatible_ops__": "skip the unused shared-memory comm JIT build on CPU",
    "deepspeed.comm:new_group": "a group of every rank is the default group (elastic rebuilds)",
}
#: instance attributes (set in constructors, so not checkable on the class): _grid, _topo,
#: tied_comms (PipelineModule); _running_engine_backward (DeepSpeedEngine);
#: _backward_hook_managers (tensors, OutputBackwardHookManager); _hp_mapping (a parameter's
#: fp32 master share under BF16_Optimizer); bf16_groups, fp32_groups_gradients (BF16_Optimizer).


def missing_members() -> list[str]:
    """Names from ``PRIVATE_MEMBERS`` that the installed DeepSpeed no longer has."""
    missing = []
    for name in PRIVATE_MEMBERS:
        module_name, path = name.split(":")
        owner = importlib.import_module(module_name)
        *owners, member = path.split(".")
        for attr in owners:
            owner = getattr(owner, attr, None)
        if owner is None or not hasattr(owner, member):
            missing.append(name)
    return missing


@contextmanager
def world_sized_groups_are_default():
    """While a pipeline module and engine are built, ``deepspeed.comm.new_group`` returns the
    default group for a group of every rank instead of forming a new one.

    With one replica DeepSpeed's pipeline builds three such groups (the module's world
    group, the model-parallel group and the pipe group), each a full mesh of connections to
    form on every rebuild after a death; they have the same members and rank order as the
    default group, and every rank issues its collectives on them in the same program order,
    so sharing the default group changes no result. Groups of fewer ranks are formed as usual.
    It is also what keeps the elastic launch's blocking pipe collectives on the default group,
    the one a recovery's teardown closes (``CheckFreePipelineModule.route_collectives_over_world``).
    """
    import deepspeed.comm as ds_comm
    import torch.distributed as tdist

    original = ds_comm.new_group

    def new_group(ranks):
        if sorted(int(r) for r in ranks) == list(range(tdist.get_world_size())):
            return tdist.group.WORLD
        return original(ranks)

    ds_comm.new_group = new_group
    try:
        yield
    finally:
        ds_comm.new_group = original


# Engine attributes that may hold the interrupted step's tensors (and through their hooks the engine).
_STEP_STATE = ("pipe_buffers", "_routed_losses", "_routed_grads", "fwd_outputs", "total_loss", "agg_loss", "loss",
               "dp_group_loss", "agg_train_loss")


def _remove_tensor_hooks(x, depth: int = 0) -> None:
    import torch
    if isinstance(x, torch.Tensor):
        for manager in getattr(x, "_backward_hook_managers", ()):
            manager.remove_hooks()
        if hasattr(x, "_backward_hook_managers"):
            del x._backward_hook_managers
    elif depth < 3 and isinstance(x, (list, tuple)):
        for item in x:
            _remove_tensor_hooks(item, depth + 1)
    elif depth < 3 and isinstance(x, dict):
        for item in x.values():
            _remove_tensor_hooks(item, depth + 1)


def _hook_owner(manager):
    fn = getattr(manager, "preprocess_once_fn", None)
    return getattr(fn, "__self__", None)


def release_engine(engine) -> None:
    """Make a dropped engine (a whole stage's weights, optimizer state and process groups)
    really go away, so that its gloo sockets close and peers blocked on it fail at once.

    DeepSpeed ties backward-hook managers, whose closures hold the engine, to the output
    tensors of the interrupted step, through autograd where the garbage collector cannot
    see them; the p2p module keeps the grid in globals. Only this engine, its module and
    its grid are cleared: another engine living in the same process is left alone.
    """
    import warnings

    from deepspeed.runtime.pipe import p2p
    from deepspeed.runtime.utils import OutputBackwardHookManager

    for name, value in list(vars(engine).items()):
        _remove_tensor_hooks(value)
        if name in _STEP_STATE:
            setattr(engine, name, None)
    grid = getattr(engine, "grid", None)
    if getattr(p2p, "_grid", None) is grid:
        p2p._grid = None
        p2p._groups = None
    with warnings.catch_warnings():  # isinstance on some lazy torch objects warns about deprecations
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, OutputBackwardHookManager) and _hook_owner(obj) is engine:
                obj.remove_hooks()
    module = getattr(engine, "module", None)
    if module is not None:
        module.tied_comms = {}
        module._grid = None
    if grid is not None:
        grid.__dict__.clear()
    engine.__dict__.clear()
    gc.collect()
