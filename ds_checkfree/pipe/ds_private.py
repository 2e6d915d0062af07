"""The private DeepSpeed surface ds-checkfree relies on, in one table, and the engine teardown.

DeepSpeed offers no public hook for a custom pipeline schedule, per-stage gradient norms or
tearing an engine down while its peers are gone, so private (or undocumented) members are
used. Every one the package touches is in ``MEMBERS``: owner, member, where it lives, why.
They were read from the DeepSpeed versions in ``TESTED_DEEPSPEED``; an upgrade is reviewed
here. ``tests/test_ds_private.py`` checks each on a built fp32 and bf16 engine and scans the
package so that an unregistered access fails; ``check_deepspeed_version`` warns at import
outside the tested range, and ``require_members`` refuses an engine build when a member is gone.
Code reads these members directly (an AttributeError, never a silent default).
"""
from __future__ import annotations

import gc
import importlib
import time
from contextlib import contextmanager
from functools import lru_cache
from typing import NamedTuple

#: the DeepSpeed versions (inclusive range) the members below were read from and tested on
TESTED_DEEPSPEED = ("0.19.8", "0.19.8")


class Member(NamedTuple):
    """One private member: ``owner`` is "module:Class" or "module"; ``name`` may be a dotted
    path below an instance attribute; ``on`` says where it is checked (``KINDS``)."""
    owner: str
    name: str
    on: str
    why: str


#: where a member lives: "class" (on the owner itself, checked without an engine), "lazy" (a module
#: attribute computed on first access: checking pays for it), else an object of a built engine
#: (``built_objects``) or of a forward pass through it (the test makes those)
KINDS = ("class", "lazy", "engine", "module", "grid", "bf16 optimizer", "bf16 parameter", "forward output",
         "hook manager", "layer spec", "tied layer spec")

_ENGINE = "deepspeed.runtime.engine:DeepSpeedEngine"
_PIPE = "deepspeed.runtime.pipe.engine:PipelineEngine"
_MODULE = "deepspeed.runtime.pipe.module:PipelineModule"
_GRID = "deepspeed.runtime.pipe.topology:PipelineParallelGrid"
_BF16 = "deepspeed.runtime.bf16_optimizer:BF16_Optimizer"
_HOOKS = "deepspeed.runtime.utils:OutputBackwardHookManager"
_SPEC = "deepspeed.runtime.pipe.module:LayerSpec"
_TIED_SPEC = "deepspeed.runtime.pipe.module:TiedLayerSpec"
_M = Member
_STAGE_PLACE = "the stage's place in the pipeline (undocumented engine attribute)"
_STEP_TENSOR = "teardown drops the interrupted step's tensors (release_engine)"

MEMBERS: tuple[Member, ...] = (
    # PipelineEngine: the schedule, the instructions and the loss (ds_checkfree.pipe.engine)
    _M(_PIPE, "_INSTRUCTION_MAP", "class", "dispatch is by exact type: overridden _exec_* and the routed "
       "instructions need a re-declared map"),
    _M(_PIPE, "_train_schedule", "class", "the schedule hook (CheckFree+'s out-of-order schedule)"),
    _M(_PIPE, "_exec_optimizer_step", "class", "gradient norms and the lr factor around the step"),
    _M(_PIPE, "_exec_reduce_tied_grads", "class", "a replica that ran no micro-batch joins with zeros"),
    _M(_PIPE, "_aggregate_total_loss", "class", "the stages' norms ride on the loss broadcast; two loss stages"),
    _M(_PIPE, "_loss_stage_global_rank", "class", "the rank that gathers the norms and broadcasts the loss"),
    _M(_PIPE, "_next_batch", "class", "every stage loads every micro-batch under CheckFree+; the redundant "
       "baseline's shadow inputs"),
    _M(_PIPE, "get_additional_losses", "class", "DeepSpeed's own loss path when the module has extra losses"),
    _M(_PIPE, "DTYPE_TO_ID", "class", "the routed sends' meta header uses DeepSpeed's dtype ids"),
    _M(_PIPE, "ID_TO_DTYPE", "class", "the routed receives' meta header"),
    _M(_ENGINE, "_backward_prologue_per_tensor", "class", "a gradient received from another stage is already "
       "scaled"),
    _M(_ENGINE, "_broadcast_model", "class", "overridden: a rebuilt engine skips the start-up broadcast of replica "
       "0's weights (each member's are replaced by its kept or re-materialised stage right after)"),
    _M(_ENGINE, "_scale_loss_by_gas", "class", "the step's loss as DeepSpeed reports it"),
    _M(_ENGINE, "_get_ckpt_name", "class", "the paper's checkpoint baseline reads one rank's states file"),
    _M(_ENGINE, "clip_fp32_gradients", "class", "overridden: clip_scope 'stage' and the post-clip norms (fp32)"),
    _M(_PIPE, "pipe_buffers", "engine", "routed instructions keep micro-batch tensors in DeepSpeed's buffers"),
    _M(_PIPE, "fwd_outputs", "engine", "the routed forward records losses as DeepSpeed's forward does"),
    _M(_PIPE, "total_loss", "engine", "the routed forward's loss sum; " + _STEP_TENSOR),
    _M(_PIPE, "agg_additional_losses", "engine", "the loss aggregation's results, read after the step"),
    _M(_PIPE, "dp_group_loss", "engine", "the loss aggregation's results; " + _STEP_TENSOR),
    _M(_PIPE, "agg_train_loss", "engine", _STEP_TENSOR),
    _M(_PIPE, "agg_loss", "engine", _STEP_TENSOR),
    _M(_PIPE, "loss", "engine", _STEP_TENSOR),
    _M(_PIPE, "using_bf16_optimizer", "engine", "the routed backward repeats DeepSpeed's bf16 gradient steps"),
    _M(_ENGINE, "_config.bfloat16_config.immediate_grad_update", "engine", "the routed backward, as DeepSpeed's"),
    _M(_ENGINE, "_running_engine_backward", "engine", "a received gradient's backward runs as the engine's own"),
    _M(_PIPE, "dynamic_shape", "engine", "routed sends repeat the meta header only when shapes vary"),
    _M(_ENGINE, "training_dataloader", "engine", "set_dataiterator under CheckFree+"),
    _M(_PIPE, "data_iterator", "engine", "set_dataiterator under CheckFree+"),
    _M(_PIPE, "is_data_parallel", "engine", "the loss's data-parallel average"),
    _M(_ENGINE, "dp_world_size", "engine", "the loss's data-parallel average"),
    _M(_ENGINE, "mpu", "engine", "the data-parallel group of the loss average"),
    _M(_PIPE, "micro_batches", "engine", _STAGE_PLACE),
    _M(_PIPE, "num_stages", "engine", _STAGE_PLACE),
    _M(_PIPE, "stage_id", "engine", _STAGE_PLACE),
    _M(_PIPE, "grid", "engine", _STAGE_PLACE + "; teardown clears it"),
    _M(_ENGINE, "global_rank", "engine", _STAGE_PLACE),
    # PipelineModule: the layout, tied layers, checkpoints (ds_checkfree.pipe.module, recovery.checkpoints)
    _M(_MODULE, "_partition_layers", "class", "overridden: the explicit stage <-> layer map"),
    _M(_MODULE, "_set_bounds", "class", "the explicit stage <-> layer map"),
    _M(_MODULE, "_synchronize_tied_weights", "class", "overridden: the broadcast runs under no_grad"),
    _M(_MODULE, "_recursive_getattr", "class", "tied weight lookup of the point-to-point tied gradients"),
    _M(_MODULE, "allreduce_tied_weight_gradients", "class", "overridden: tied gradients point-to-point (elastic)"),
    _M(_MODULE, "get_tied_weights_and_groups", "class", "replicas that ran no micro-batch"),
    _M(_MODULE, "ckpt_layer_path", "class", "the layer files of the paper's checkpoint baseline"),
    _M(_MODULE, "mpu", "class", "the grid as DeepSpeed's mpu, for the engine build"),
    _M(_MODULE, "_topo", "module", "the stage of this rank, while partitioning"),
    _M(_MODULE, "_grid", "module", "teardown clears the dropped module's grid"),
    _M(_MODULE, "tied_comms", "module", "the tied gradients' owners; teardown clears them"),
    _M(_MODULE, "tied_modules", "module", "the tied weights of the point-to-point exchange"),
    _M(_MODULE, "forward_funcs", "module", "the stage's layers: roles, swapped order, checkpoint layer files"),
    _M(_MODULE, "parts", "module", "the partition bounds DeepSpeed's _partition_layers contract sets"),
    _M(_MODULE, "loss_fn", "module", "the routed forward's loss"),
    _M(_MODULE, "global_rank", "module", "the stage of this rank, while partitioning"),
    _M(_MODULE, "stage_id", "module", "the module's stage"),
    _M(_SPEC, "typename", "layer spec", "a replicated head/tail layer wraps the user's spec"),
    _M(_SPEC, "module_args", "layer spec", "a replicated head/tail layer wraps the user's spec"),
    _M(_SPEC, "module_kwargs", "layer spec", "a replicated head/tail layer wraps the user's spec"),
    _M(_TIED_SPEC, "tied_weight_attr", "tied layer spec", "named after the build (read after building)"),
    _M(_TIED_SPEC, "key", "tied layer spec", "a user's tied layer keeps its own key"),
    _M("deepspeed.runtime.pipe.schedule:PipeSchedule", "_valid_stage", "class", "the out-of-order schedule's "
       "stage check"),
    # the grid (undocumented class)
    _M(_GRID, "stage_to_global", "class", "routed sends, replica and copy exchanges address a stage's rank"),
    _M(_GRID, "get_pipe_parallel_group", "class", "the norms' and loss's group"),
    _M(_GRID, "get_data_parallel_group", "class", "the loss's data-parallel average"),
    _M(_GRID, "get_data_parallel_world_size", "class", "replicas per stage: partitioned bf16 masters"),
    _M(_GRID, "get_data_parallel_id", "class", "which replica this rank is"),
    _M(_GRID, "get_data_parallel_rank", "class", "the HF export's first replica of a stage writes its shard"),
    # BF16_Optimizer and its fp32 masters (ds_checkfree.pipe.engine, pipe.stage_weights)
    _M(_BF16, "clear_lp_grads", "class", "the routed backward, as PipelineEngine._exec_backward_pass"),
    _M(_BF16, "update_hp_grads", "class", "the routed backward, as PipelineEngine._exec_backward_pass"),
    _M(_BF16, "bf16_groups", "bf16 optimizer", "bf16 norms read the fp32 gradients, matched by parameter"),
    _M(_BF16, "fp32_groups_gradients", "bf16 optimizer", "bf16 norms read the fp32 gradients the step applies"),
    _M(_BF16, "clip_grad", "bf16 optimizer", "bf16's post-clip norms: it clips inside its own step"),
    _M(_BF16, "_global_grad_norm", "bf16 optimizer", "bf16's post-clip norms (set by every step)"),
    _M(_BF16, "optimizer", "bf16 optimizer", "the wrapped optimizer holds the moments"),
    _M(_BF16, "_hp_mapping", "bf16 parameter", "set on every bf16 parameter: this replica's share of its fp32 "
       "master (a hand-off carries the shares)"),
    _M("deepspeed.utils.tensor_fragment:tensor_fragment", "get_hp_fragment", "class", "the share itself"),
    # teardown of a dropped engine (release_engine)
    _M("deepspeed.runtime.utils", "OutputBackwardHookManager", "class", "teardown finds a dropped engine's hooks"),
    _M(_HOOKS, "remove_hooks", "class", "hooks whose closures keep a dropped engine alive"),
    _M(_HOOKS, "preprocess_per_tensor_fn", "hook manager", "names the engine a hook manager belongs to"),
    _M(_HOOKS, "_backward_hook_managers", "forward output", "set on an output tensor: the hook managers it keeps"),
    _M("deepspeed.runtime.pipe.p2p", "_grid", "class", "module global holding the old grid"),
    _M("deepspeed.runtime.pipe.p2p", "_groups", "class", "module global holding the old groups"),
    # builds
    _M("deepspeed", "set_optimizer_flags", "class", "initialize repeats deepspeed.initialize for our engine class"),
    _M("deepspeed.runtime.config", "DeepSpeedConfig", "class", "initialize builds the engine's config object"),
    _M("deepspeed.runtime.utils", "clip_grad_norm_", "class", "DeepSpeed's clipping, with the norm it returns"),
    _M("deepspeed.comm", "new_group", "class", "patched while building: a group of every rank is the default "
       "group (elastic rebuilds); DeepSpeed's pipeline calls it through the module"),
    _M("deepspeed.ops", "__compatible_ops__", "lazy", "skip the unused shared-memory comm JIT build on CPU"),
    _M("torch.distributed.distributed_c10d", "default_pg_timeout", "class", "DeepSpeed's subgroups get no timeout: "
       "the elastic runtime sets this default (non-NCCL backends; NCCL reads default_pg_nccl_timeout)"),
)


def _member_label(member: Member) -> str:
    owner = member.owner.split(":")[-1]
    return f"{owner}.{member.name}" + ("" if member.on in ("class", "lazy") else f" (on the {member.on})")


def _has_path(obj, dotted: str) -> bool:
    for attr in dotted.split("."):
        if not hasattr(obj, attr):
            return False
        obj = getattr(obj, attr)
    return True


def _owner(spec: str):
    module_name, _, path = spec.partition(":")
    owner = importlib.import_module(module_name)
    for attr in filter(None, path.split(".")):
        owner = getattr(owner, attr)
    return owner


def missing_members(kinds=("class", "lazy")) -> list[str]:
    """The members of ``kinds`` that the installed DeepSpeed (or torch) no longer has, checked
    on their owners without an engine ("lazy" ones are computed by the check)."""
    missing = []
    for member in MEMBERS:
        if member.on not in kinds:
            continue
        try:
            found = _has_path(_owner(member.owner), member.name)
        except (ImportError, AttributeError):
            found = False
        if not found:
            missing.append(_member_label(member))
    return missing


def built_objects(engine) -> dict[str, list]:
    """The objects of a built engine that the instance members live on, by kind (the bf16
    ones only when the configuration trains in bf16: fp32 has no BF16_Optimizer)."""
    objects = {"engine": [engine], "module": [engine.module], "grid": [engine.grid]}
    if engine.bfloat16_enabled():
        objects["bf16 optimizer"] = [engine.optimizer]
        objects["bf16 parameter"] = [p for p in engine.module.parameters() if p.requires_grad]
    return objects


def missing_on(objects: dict[str, list]) -> list[str]:
    """The instance members missing on any of ``objects`` (kind -> objects, e.g. ``built_objects``)."""
    return [_member_label(m) for m in MEMBERS if m.on in objects
            and not all(_has_path(obj, m.name) for obj in objects[m.on])]


@lru_cache(maxsize=1)
def require_members() -> None:
    """Refuse to build an engine on a DeepSpeed that lacks a member the package relies on (an
    overridden hook that DeepSpeed renamed would otherwise be silently skipped). Once per process."""
    missing = missing_members(kinds=("class",))
    if missing:
        import deepspeed
        raise RuntimeError(f"deepspeed {deepspeed.__version__} lacks {', '.join(missing)}, which ds-checkfree relies "
                           f"on (tested with deepspeed {_tested_range()}). Fix: install a tested version, or "
                           "review ds_checkfree/pipe/ds_private.py for this one.")


def _tested_range() -> str:
    low, high = TESTED_DEEPSPEED
    return low if low == high else f"{low} to {high}"


def check_deepspeed_version(installed: str | None = None) -> str | None:
    """Warn when the installed DeepSpeed is outside ``TESTED_DEEPSPEED`` (its private members may
    differ); returns the warning's text, None inside the range. Reads the installed metadata
    only: importing the package stays cheap."""
    import warnings
    from importlib import metadata

    from packaging.version import Version
    if installed is None:
        try:
            installed = metadata.version("deepspeed")
        except metadata.PackageNotFoundError:
            installed = None
    if installed is not None and Version(TESTED_DEEPSPEED[0]) <= Version(installed) <= Version(TESTED_DEEPSPEED[1]):
        return None
    found = "no deepspeed is installed" if installed is None else f"deepspeed {installed} is installed"
    text = (f"ds-checkfree was tested with deepspeed {_tested_range()} but {found}: it relies on private DeepSpeed "
            "members (ds_checkfree/pipe/ds_private.py) that may differ. Fix: "
            f"pip install deepspeed=={TESTED_DEEPSPEED[1]}, or run tests/test_ds_private.py against this version.")
    warnings.warn(text, RuntimeWarning, stacklevel=2)
    return text


def set_default_group_timeout(timeout) -> None:
    """The timeout of process groups created without one (DeepSpeed's subgroups), non-NCCL backends."""
    from torch.distributed import distributed_c10d
    if not hasattr(distributed_c10d, "default_pg_timeout"):
        raise RuntimeError("torch.distributed.distributed_c10d.default_pg_timeout is gone: DeepSpeed's subgroups would "
                           "keep torch's default timeout. Fix: review ds_private.set_default_group_timeout.")
    distributed_c10d.default_pg_timeout = timeout


@contextmanager
def one_group_per_member_set(kept=None):
    """While a pipeline module and engine are built, ``deepspeed.comm.new_group`` forms one
    group per set of members: a group of every rank is the default group, and a set of
    members already asked for gets the group formed for it the first time.

    DeepSpeed's grid asks for the same members several times: with one replica the module's
    world group, the model-parallel group and the pipe group are all the default group's
    members; with replicas each pipe is asked for twice (the pipe group and the "model
    group" of its data-parallel index). Every one is a rendezvous and a mesh of connections
    to form again on every rebuild after a death. The members and their rank order are the
    same, every rank asks in the same order (so torch's group numbering stays in step) and
    issues its collectives on them in the same program order, so sharing changes no result.
    It is also what keeps the elastic launch's blocking pipe collectives on the default group,
    the one a recovery's teardown closes (``CheckFreePipelineModule.route_collectives_over_world``).

    ``kept(members)``: a group kept for that member set (a recovery's idle copy,
    ``elastic.standby_groups``) or None. With it, a set is formed by its own members alone
    (``use_local_synchronization``: torch then names it by its members, not by a count that a
    member keeping a group would no longer keep in step) and the other ranks skip the call.
    """
    import deepspeed.comm as ds_comm
    import torch.distributed as tdist

    original = ds_comm.new_group
    me = tdist.get_rank()
    formed: dict[tuple[int, ...], object] = {tuple(range(tdist.get_world_size())): tdist.group.WORLD}
    #: seconds spent forming groups (wall, and this process's CPU: the rest is waiting for the
    #: groups' other members), how many were formed and kept, and the member sets this rank is in
    spent = {"groups_s": 0.0, "groups_cpu_s": 0.0, "groups": 0, "kept": 0, "own_sets": [], "formed_sets": []}

    def form(members: tuple[int, ...]):
        if kept is None:
            return original(list(members))
        if me not in members:
            return tdist.GroupMember.NON_GROUP_MEMBER
        group = kept(members)
        if group is not None:
            spent["kept"] += 1
            return group
        spent["formed_sets"].append(members)
        return tdist.new_group(list(members), use_local_synchronization=True)

    def new_group(ranks):
        members = tuple(sorted(int(r) for r in ranks))
        if members not in formed:
            t0, c0 = time.perf_counter(), time.process_time()
            kept_before = spent["kept"]
            formed[members] = form(members)
            if spent["kept"] == kept_before:
                spent["groups_s"] += time.perf_counter() - t0
                spent["groups_cpu_s"] += time.process_time() - c0
                spent["groups"] += me in members or kept is None
            if me in members:
                spent["own_sets"].append(members)
        return formed[members]

    ds_comm.new_group = new_group
    try:
        yield spent
    finally:
        ds_comm.new_group = original


# Engine attributes that may hold the interrupted step's tensors (and through their hooks the engine).
_STEP_STATE = ("pipe_buffers", "_routed_losses", "_routed_grads", "fwd_outputs", "total_loss", "agg_loss", "loss",
               "dp_group_loss", "agg_train_loss")


def _remove_tensor_hooks(x, depth: int = 0) -> None:
    import torch
    if isinstance(x, torch.Tensor):
        # only tensors DeepSpeed hooked carry the attribute (MEMBERS: checked on a forward output)
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


def hook_owner(manager):
    """The engine an ``OutputBackwardHookManager`` belongs to: DeepSpeed's forward passes the
    engine's bound ``_backward_prologue_per_tensor`` (its once-per-backward function is a
    closure); None for a manager registered without one."""
    return getattr(manager.preprocess_per_tensor_fn, "__self__", None)


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
    grid, module = engine.grid, engine.module
    if p2p._grid is grid:
        p2p._grid = None
        p2p._groups = None
    with warnings.catch_warnings():  # isinstance on some lazy torch objects warns about deprecations
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, OutputBackwardHookManager) and hook_owner(obj) is engine:
                obj.remove_hooks()
    module.tied_comms = {}
    module._grid = None
    grid.__dict__.clear()
    engine.__dict__.clear()
    gc.collect()
