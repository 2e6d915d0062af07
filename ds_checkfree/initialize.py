"""``ds_checkfree.initialize``: the counterpart of ``deepspeed.initialize``.

``deepspeed.initialize`` picks ``PipelineEngine`` by a hard-coded type check, so we build
our engine ourselves and repeat what it does besides (distributed init, config object).
All configuration is validated before any process group starts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

from .config import CheckFreeConfig, ConfigError, micro_batches_per_step, split_deepspeed_config, validate_world
from .models import ModelConfig, load_model_config


@dataclass
class Setup:
    """Everything validated before the process group starts."""
    ds_config: dict
    checkfree: CheckFreeConfig
    model: ModelConfig
    world_size: int
    dp_size: int
    micro_batches: int


def _env_world_size() -> int | None:
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(key):
            return int(os.environ[key])
    return None


def prepare(config, model: str | ModelConfig = "tiny", model_overrides: dict | None = None,
            world_size: int | None = None, elastic: bool = False) -> Setup:
    """Parse and cross-check the DeepSpeed JSON, the checkfree section and the model.

    ``world_size`` counts every launched rank, spares included; ``elastic`` says the job
    runs under the MPI fault-tolerant launch, the only one where spares make sense."""
    ds_config, cf = split_deepspeed_config(config)
    model_cfg = model if isinstance(model, ModelConfig) else load_model_config(model, **(model_overrides or {}))
    world = world_size if world_size is not None else (_env_world_size() or 1)
    provisional_dp = max(1, (world - cf.spares) // cf.num_stages)
    micro = micro_batches_per_step(ds_config, provisional_dp)
    dp = validate_world(cf, world, model_cfg.num_layers, micro)
    precision = [k for k in ("fp16", "bf16", "bfloat16") if ds_config.get(k, {}).get("enabled")]
    if cf.mode != "off" and precision:
        raise ConfigError(f"{precision[0]}.enabled = True: CheckFree recovery currently rebuilds fp32 weights only. "
                          f"Fix: disable {precision[0]} or set checkfree.mode to \"off\".")
    act_ckpt = ds_config.get("pipeline", {}).get("activation_checkpoint_interval", 0)
    if cf.mode == "checkfree_plus" and act_ckpt:
        raise ConfigError(f"pipeline.activation_checkpoint_interval = {act_ckpt!r}: the out-of-order schedule runs "
                          "layers one by one. Fix: set it to 0 with checkfree_plus.")
    if cf.spares and not elastic:
        raise ConfigError(f"checkfree.spares = {cf.spares!r}: spare ranks need the MPI fault-tolerant launch. "
                          "Fix: launch with `mpirun --with-ft ulfm -n <stages+spares> python launch/train.py ...`, "
                          "or set checkfree.spares to 0.")
    if elastic and dp != 1:
        raise ConfigError(f"data-parallel size {dp}: the fault-tolerant launch supports one replica per stage. "
                          f"Fix: launch {cf.num_stages} stage ranks plus the spares.")
    return Setup(ds_config, cf, model_cfg, world, dp, micro)


def _skip_shm_comm_build() -> None:
    """Pipeline training never uses DeepSpeed's shared-memory all-reduce; skip its g++ JIT build."""
    import deepspeed.ops
    try:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except Exception:  # pragma: no cover - layout of deepspeed.ops changed
        pass


def initialize(config, model: str | ModelConfig = "tiny", model_overrides: dict | None = None, args=None,
               base_seed: int = 1234, dist_timeout_s: float = 120.0, engine_class=None, elastic: bool = False):
    """Build the CheckFree pipeline engine; returns ``(engine, setup)``.

    ``engine_class`` may be DeepSpeed's stock ``PipelineEngine`` (benchmarks compare them).
    ``elastic``: torch.distributed already holds the stage ranks only (``ds_checkfree.elastic``).
    """
    pre_cf = split_deepspeed_config(config)[1]
    spares = pre_cf.spares if elastic else 0
    env_world = _env_world_size()
    setup = prepare(config, model, model_overrides,
                    world_size=(env_world + spares) if (elastic and env_world) else None, elastic=elastic)
    import deepspeed
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.config import DeepSpeedConfig

    from .engine import CheckFreePipelineEngine
    from .module import CheckFreePipelineModule

    if get_accelerator().device_name() == "cpu":
        _skip_shm_comm_build()
    deepspeed.init_distributed(timeout=timedelta(seconds=dist_timeout_s))
    if dist.get_world_size() + spares != setup.world_size:
        setup = prepare(config, model, model_overrides, world_size=dist.get_world_size() + spares, elastic=elastic)
    if args is not None and hasattr(args, "local_rank"):
        args.local_rank = int(os.environ.get("LOCAL_RANK", 0))

    module = CheckFreePipelineModule(setup.model, setup.checkfree.num_stages, setup.checkfree.mode,
                                     base_seed=base_seed)
    if elastic:
        _route_collectives_over_world(module)
    mpu = module.mpu()
    config_class = DeepSpeedConfig(setup.ds_config, mpu)
    if hasattr(deepspeed, "set_optimizer_flags"):
        deepspeed.set_optimizer_flags(config_class, module)
    engine_class = engine_class or CheckFreePipelineEngine
    kwargs = {"checkfree_config": setup.checkfree} if issubclass(engine_class, CheckFreePipelineEngine) else {}
    engine = engine_class(args=args, model=module, model_parameters=[p for p in module.parameters() if p.requires_grad],
                          mpu=mpu, config=setup.ds_config, config_class=config_class, **kwargs)
    return engine, setup


def _route_collectives_over_world(module) -> None:
    """Elastic launch: keep every blocking collective on the default process group.

    A survivor unblocks a peer waiting on it by closing its gloo sockets, but a DeepSpeed
    subgroup stays open as long as anything references it, and the pipeline's autograd
    hooks keep the old engine (and its groups) alive after a failure. With one replica
    (the elastic launch requires dp = 1) the pipe group has the same members as the world,
    so its collectives run on the default group (``group=None``); the tied (de)embedding
    gradients of CheckFree+ are exchanged point-to-point on the default group as well.
    """
    grid = module._grid
    if grid.get_data_parallel_world_size() != 1:
        raise ValueError("the elastic launch needs one data-parallel replica")
    grid.pp_proc_group = None  # deepspeed.comm treats None as the default group
    module.tied_gradients_point_to_point = True
