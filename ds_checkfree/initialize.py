"""``ds_checkfree.initialize``: the counterpart of ``deepspeed.initialize``.

``deepspeed.initialize`` picks ``PipelineEngine`` by a hard-coded type check, so we build
our engine ourselves and repeat what it does besides (distributed init, config object).
All configuration is validated before any process group starts.
"""
from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

from ds_checkfree.config.checkfree import CheckFreeConfig, ConfigError, check_against_deepspeed
from ds_checkfree.config.deepspeed_checks import micro_batches_per_step, split_deepspeed_config, validate_world
from ds_checkfree.pipe.ds_private import require_members, one_group_per_member_set
from ds_checkfree.models.sources import resolve_model


def _check_failure_schedule(cf: CheckFreeConfig) -> None:
    if cf.failure_schedule is None:
        return
    from ds_checkfree.recovery.injection import load_schedule_file
    try:
        load_schedule_file(cf.failure_schedule, cf.num_stages)
    except (OSError, ValueError) as err:
        raise ConfigError(f"checkfree.failure_schedule = {cf.failure_schedule!r}: {err}.") from None


def _check_zero(ds_config: dict, cf: CheckFreeConfig) -> None:
    """ZeRO (stage 1, the only one DeepSpeed's pipeline takes) keeps its own fp32 copy of the
    weights and reduces the gradients into its own buffers, neither of which recovery writes or
    reads: measured on 4 ranks, a rebuilt stage's weights were overwritten by ZeRO's stale copy at
    the next step (the lost stage came back as it was) and every gradient norm read 0, so a
    weighted average silently became a plain mean. Refused until recovery writes ZeRO's copy."""
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    if cf.mode == "off" or not stage:
        return
    raise ConfigError(f"zero_optimization.stage = {stage!r} with checkfree.mode = {cf.mode!r}: recovery rebuilds a "
                      "stage's parameters (and bf16's fp32 masters) in memory, but ZeRO keeps its own fp32 copy of "
                      "the weights and its own gradient buffers, so the next optimizer step would overwrite the "
                      "rebuilt stage with the lost one and the neighbours' gradient norms would read 0; not "
                      "implemented. Fix: set zero_optimization.stage to 0 (under bf16 DeepSpeed's BF16_Optimizer "
                      "already splits the fp32 masters and Adam moments over data-parallel replicas, as ZeRO-1 "
                      "would), or checkfree.mode to \"off\" for a checkpoint baseline with ZeRO.")


def _check_precision(ds_config: dict, cf: CheckFreeConfig, dp: int) -> None:
    """bf16 is recovered (fp32 masters averaged/copied, bf16 parameters their cast); fp16 is not.
    With data-parallel replicas DeepSpeed's BF16_Optimizer splits the fp32 masters over the
    replicas: a lost replica gets the bf16 weights exactly and its share of the masters from
    them (``engine.masters_partitioned``); layout "paper"'s stage copies read the whole masters."""
    if cf.mode == "off":
        return
    if ds_config.get("fp16", {}).get("enabled"):
        raise ConfigError("fp16.enabled = True: CheckFree recovery does not rebuild fp16 training (DeepSpeed's "
                          "FP16_Optimizer couples the fp32 masters to a dynamic loss scale shared by every stage, "
                          "which a rebuilt stage would have to rejoin mid-run; not implemented). "
                          "Fix: use \"bf16\": {\"enabled\": true} instead, disable fp16, or set checkfree.mode "
                          "to \"off\".")
    bf16 = next((k for k in ("bf16", "bfloat16") if ds_config.get(k, {}).get("enabled")), None)
    if bf16 is None:
        return
    if cf.mode == "redundant":
        raise ConfigError(f"{bf16}.enabled = True: mode 'redundant' ships fp32 gradients to its shadow copies. "
                          f"Fix: disable {bf16} or use mode 'checkfree'/'checkfree_plus'.")
    if cf.mode == "checkfree_plus" and not cf.swap:
        raise ConfigError(f"checkfree.swap = False with {bf16}: a replicated (de)embedding that runs no micro-batch "
                          "has no fp32 gradient for DeepSpeed's tied-gradient all-reduce under BF16_Optimizer. "
                          f"Fix: keep checkfree.swap = true, or disable {bf16}.")


@dataclass
class Setup:
    """Everything validated before the process group starts."""
    ds_config: dict
    checkfree: CheckFreeConfig
    #: the model source (``models.sources``): a ModelConfig (built-in LLaMA), an HF directory, user parts
    model: object
    world_size: int
    dp_size: int
    micro_batches: int


def _env_world_size() -> int | None:
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(key):
            return int(os.environ[key])
    return None


def prepare(config, model="tiny", model_overrides: dict | None = None,
            world_size: int | None = None, elastic: bool = False) -> Setup:
    """Parse and cross-check the DeepSpeed JSON, the checkfree section and the model.

    ``world_size`` counts every launched rank, spares included; ``elastic`` says the job
    runs under the MPI fault-tolerant launch, the only one where spares make sense."""
    ds_config, cf = split_deepspeed_config(config)
    model_cfg = resolve_model(model, model_overrides)
    _check_failure_schedule(cf)
    world = world_size if world_size is not None else (_env_world_size() or 1)
    provisional_dp = max(1, (world - cf.spares) // cf.num_stages)
    micro = micro_batches_per_step(ds_config, provisional_dp)
    dp = validate_world(cf, world, model_cfg.num_blocks, micro)
    _check_zero(ds_config, cf)
    _check_precision(ds_config, cf, dp)
    check_against_deepspeed(cf, ds_config)
    act_ckpt = ds_config.get("pipeline", {}).get("activation_checkpoint_interval", 0)
    if cf.mode == "checkfree_plus" and act_ckpt:
        raise ConfigError(f"pipeline.activation_checkpoint_interval = {act_ckpt!r}: the out-of-order schedule runs "
                          "layers one by one. Fix: set it to 0 with checkfree_plus.")
    if act_ckpt:  # the pipeline module is built without it in every mode: refuse rather than drop it
        raise ConfigError(f"pipeline.activation_checkpoint_interval = {act_ckpt!r}: activation checkpointing is not "
                          f"wired into this extension's pipeline module (mode {cf.mode!r} would silently train "
                          "without it). Fix: set it to 0 or remove the key.")
    if cf.spares and not elastic:
        raise ConfigError(f"checkfree.spares = {cf.spares!r}: spare ranks need the MPI fault-tolerant launch. "
                          "Fix: launch with `mpirun --with-ft ulfm -n <stages+spares> python launch/train.py ...`, "
                          "or set checkfree.spares to 0.")
    return Setup(ds_config, cf, model_cfg, world, dp, micro)


def _skip_shm_comm_build() -> None:
    """Pipeline training never uses DeepSpeed's shared-memory all-reduce; skip its g++ JIT build."""
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # private: ds_private.MEMBERS


def warm_up_first_build() -> None:
    """Pay a process's one-time costs of its first engine build now, before any group exists.

    A spare builds its first engine inside a recovery, and the survivors wait for it in the
    engine's first collective: DeepSpeed's op-compatibility probe (about 0.1 s on CPU, once
    per process) and the modules its config parser imports lazily would sit on every
    recovery's critical path. A spare calls this while it waits for a stage."""
    import importlib

    from deepspeed.accelerator import get_accelerator

    # the config parser imports auto_ep_config on its first call
    for name in ("deepspeed.runtime.pipe.engine", "deepspeed.module_inject.auto_ep_config", "ds_checkfree.pipe.engine",
                 "ds_checkfree.pipe.module"):
        importlib.import_module(name)
    if get_accelerator().device_name() == "cpu":
        _skip_shm_comm_build()


def build(config, model="tiny", model_overrides: dict | None = None,
          base_seed: int = 1234, dist_timeout_s: float = 120.0, engine_class=None, elastic: bool = False,
          rebuilt: bool = False, kept_groups=None):
    """Build the CheckFree pipeline engine; returns ``(engine, setup)``.

    ``config`` is a ``Setup`` already validated by ``prepare`` (what ``launch/train.py``
    passes: the config is parsed once per process), or a DeepSpeed config dict / path.
    ``engine_class`` may be DeepSpeed's stock ``PipelineEngine`` (benchmarks compare them).
    ``elastic``: torch.distributed already holds the stage ranks only (``ds_checkfree.elastic.world``).
    ``rebuilt``: a recovery's engine, whose every parameter is replaced right after (no start-up
    broadcast of replica 0's weights).
    ``kept_groups(members)``: (elastic) a group kept from before a recovery for that member set,
    or None to form it (``ds_private.one_group_per_member_set``).
    """
    if isinstance(config, Setup):
        setup = config
    else:
        pre_cf = split_deepspeed_config(config)[1]
        spares = pre_cf.spares if elastic else 0
        env_world = _env_world_size()
        setup = prepare(config, model, model_overrides,
                        world_size=(env_world + spares) if (elastic and env_world) else None, elastic=elastic)
    spares = setup.checkfree.spares if elastic else 0
    import deepspeed
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.config import DeepSpeedConfig

    from ds_checkfree.pipe.engine import CheckFreePipelineEngine
    from ds_checkfree.pipe.module import CheckFreePipelineModule

    require_members()  # a DeepSpeed without a private member we rely on is refused before any group forms
    if get_accelerator().device_name() == "cpu":
        _skip_shm_comm_build()
    deepspeed.init_distributed(timeout=timedelta(seconds=dist_timeout_s))
    if dist.get_world_size() + spares != setup.world_size:
        if isinstance(config, Setup):
            raise ConfigError(f"the process group has {dist.get_world_size()} ranks (+ {spares} spares) but the "
                              f"configuration was validated for {setup.world_size}. Fix: launch as many ranks as "
                              "WORLD_SIZE says.")
        setup = prepare(config, model, model_overrides, world_size=dist.get_world_size() + spares, elastic=elastic)

    t0 = time.perf_counter()
    # elastic: a group of every rank is the default group, not a new one (fewer connections to
    # form on each rebuild; the default group is the one a recovery tears down anyway)
    with (one_group_per_member_set(kept_groups) if elastic else nullcontext()) as groups:
        module = CheckFreePipelineModule(setup.model.parts(base_seed), setup.checkfree.num_stages,
                                         setup.checkfree.mode, layout=setup.checkfree.layout, checked=True)
        if elastic:
            module.route_collectives_over_world()
        t_module = time.perf_counter()
        mpu = module.mpu()
        config_class = DeepSpeedConfig(setup.ds_config, mpu)
        deepspeed.set_optimizer_flags(config_class, module)  # undocumented: ds_private.MEMBERS
        engine_class = engine_class or CheckFreePipelineEngine
        kwargs = {}
        if issubclass(engine_class, CheckFreePipelineEngine):
            kwargs["checkfree_config"] = setup.checkfree
            kwargs["rebuilt"] = rebuilt
            if elastic:  # a round's abort of NCCL groups must fail the step it cut short
                from ds_checkfree.elastic.data_plane import check_not_aborted
                kwargs["abort_check"] = check_not_aborted
        engine = engine_class(args=None, model=module,
                              model_parameters=[p for p in module.parameters() if p.requires_grad],
                              mpu=mpu, config=setup.ds_config, config_class=config_class, **kwargs)
    #: where the build's time went (a recovery's phase table splits its engine rebuild with it)
    engine.build_seconds = {"module_s": round(t_module - t0, 4), "engine_s": round(time.perf_counter() - t_module, 4)}
    if groups is not None:  # of the module's part: forming its process groups (elastic)
        engine.build_seconds.update(groups_s=round(groups["groups_s"], 4), groups_cpu_s=round(groups["groups_cpu_s"], 4),
                                    groups=groups["groups"], groups_kept=groups["kept"])
        #: the member sets this rank shares a group with (their idle copies form while it trains),
        #: and those this build formed anew
        engine.group_member_sets, engine.formed_member_sets = groups["own_sets"], groups["formed_sets"]
    engine.setup = setup
    return engine, setup


def initialize(config, model="tiny", model_overrides: dict | None = None, base_seed: int = 1234,
               dist_timeout_s: float = 120.0):
    """The counterpart of ``deepspeed.initialize`` for a fault-tolerant pipeline.

    ``config``: the DeepSpeed config (dict or JSON path) with its ``checkfree`` section.
    ``model``: ``ds_checkfree.PipelineParts`` (your own layers: head, blocks, tail, loss_fn),
    ``"hf:DIR"`` (a local Hugging Face causal LM), a built-in preset name or model YAML.
    Returns ``(engine, optimizer, None, lr_scheduler)`` as ``deepspeed.initialize`` does (no
    dataloader: feed ``engine.train_batch(data_iter)``); ``engine.setup`` holds the validated
    configuration. Logical failures and real deaths are handled by ``ds_checkfree.Manager``."""
    engine, _ = build(config, model, model_overrides, base_seed=base_seed, dist_timeout_s=dist_timeout_s)
    return engine, engine.optimizer, None, engine.lr_scheduler
