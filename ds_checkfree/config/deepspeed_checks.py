"""The DeepSpeed JSON around our section, and the launch shape, checked before any process group.

``config.py`` validates the ``checkfree`` section on its own; this module separates it from
the DeepSpeed config (which rejects unknown keys), checks the batch keys DeepSpeed needs,
and cross-checks both against the world size and the model (stages dividing the ranks and
the layers, micro-batches for CheckFree+). Errors name the key, the value and the fix.
"""
from __future__ import annotations

import copy
import json
import os

from ds_checkfree.config.checkfree import SECTION, CheckFreeConfig, ConfigError, _fail, _k, format_fail_entry
from ds_checkfree.config.layout import block_stages
from ds_checkfree.config.modes import MIN_STAGES

__all__ = ["split_deepspeed_config", "micro_batches_per_step", "validate_world"]


def _load_json(path: str | os.PathLike) -> dict:
    p = os.fspath(path)
    try:
        with open(p, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(
            f"config file {p!r}: not found (resolved to {os.path.abspath(p)!r}). "
            "Fix: pass the path of an existing DeepSpeed JSON config."
        ) from None
    except OSError as e:
        raise ConfigError(f"config file {p!r}: cannot read ({e}). Fix: check the path.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"config file {p!r}: invalid JSON at line {e.lineno} column {e.colno} "
            f"(char {e.pos}): {e.msg}. Fix: correct the JSON syntax there."
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {p!r}: top level is {type(data).__name__}, expected a JSON object. "
            "Fix: the DeepSpeed config must be an object {...}."
        )
    return data


def _positive_int(ds: dict, key: str, required: bool) -> None:
    if key not in ds:
        if required:
            raise ConfigError(
                f"{key} = <missing>: required by the pipeline engine. "
                f"Fix: add \"{key}\": 1 (or larger) to the DeepSpeed config."
            )
        return
    value = ds[key]
    if not (isinstance(value, int) and not isinstance(value, bool)) or value <= 0:
        raise _fail(key, value, "must be a positive integer", f'set "{key}" to an integer >= 1')


def split_deepspeed_config(config: dict | str | os.PathLike) -> tuple[dict, CheckFreeConfig]:
    """Separate our section from the DeepSpeed config, which would reject unknown keys.

    Returns a deep copy of the DeepSpeed part (the caller's dict is not mutated)
    and the parsed config; a missing section means ``mode="off"``.
    """
    if isinstance(config, dict):
        ds = copy.deepcopy(config)
    elif isinstance(config, (str, os.PathLike)):
        ds = _load_json(config)
    else:
        raise ConfigError(
            f"config = {config!r}: wrong type {type(config).__name__}. "
            "Fix: pass a dict or the path of a DeepSpeed JSON file."
        )
    section = ds.pop(SECTION, None)
    cfg = CheckFreeConfig(mode="off") if section is None else CheckFreeConfig.from_dict(section)
    _positive_int(ds, "train_micro_batch_size_per_gpu", required=True)
    _positive_int(ds, "train_batch_size", required=False)
    _positive_int(ds, "gradient_accumulation_steps", required=False)
    return ds, cfg


def micro_batches_per_step(ds_config: dict, dp_size: int) -> int:
    """Gradient-accumulation steps, i.e. micro-batches each pipeline runs per step."""
    if not (isinstance(dp_size, int) and not isinstance(dp_size, bool)) or dp_size < 1:
        raise _fail("dp_size", dp_size, "must be a positive integer",
                    "pass (world_size - spares) // num_stages")
    _positive_int(ds_config, "train_micro_batch_size_per_gpu", required=True)
    _positive_int(ds_config, "train_batch_size", required=False)
    _positive_int(ds_config, "gradient_accumulation_steps", required=False)
    micro = ds_config["train_micro_batch_size_per_gpu"]
    gas = ds_config.get("gradient_accumulation_steps")
    tbs = ds_config.get("train_batch_size")
    if tbs is None:
        return gas if gas is not None else 1
    per_step = micro * dp_size
    if gas is not None:
        if tbs != per_step * gas:
            raise _fail(
                "train_batch_size", tbs,
                f"disagrees with train_micro_batch_size_per_gpu ({micro}) * "
                f"gradient_accumulation_steps ({gas}) * data-parallel size ({dp_size}) "
                f"= {per_step * gas}",
                f"set train_batch_size to {per_step * gas}, or drop one of the two keys",
            )
        return gas
    if tbs % per_step != 0:
        lo = max(per_step, tbs // per_step * per_step)
        raise _fail(
            "train_batch_size", tbs,
            f"not divisible by train_micro_batch_size_per_gpu ({micro}) * "
            f"data-parallel size ({dp_size}) = {per_step}",
            f"use a multiple of {per_step}, e.g. {lo} or {lo + per_step}",
        )
    return tbs // per_step


def validate_world(cfg: CheckFreeConfig, world_size: int, num_layers: int, micro_batches: int) -> int:
    """Check the config against the launch shape before any group forms; return the dp size."""
    S = cfg.num_stages
    active = world_size - cfg.spares
    if active <= 0:
        raise _fail(
            _k("spares"), cfg.spares,
            f"leaves {active} training ranks out of world size {world_size}",
            f"use fewer spares (at most {world_size - S}) or launch more ranks",
        )
    if active % S != 0:
        need = MIN_STAGES[cfg.mode]
        options = [d for d in range(max(need, 1), active + 1) if active % d == 0]
        raise _fail(
            _k("num_stages"), S,
            f"world size {world_size} minus spares {cfg.spares} = {active} ranks is not "
            f"divisible by {S} stages",
            (f"use num_stages in {options}" if options else
             f"launch a multiple of {S} ranks (+ spares)") + ", or change the world size/spares",
        )
    B = len(block_stages(S, cfg.layout))  # stages holding decoder layers
    if num_layers < B:
        raise _fail(
            "num_layers", num_layers, f"fewer layers than the {B} pipeline stages that hold decoder layers",
            f"use at least {B} layers or fewer stages",
        )
    if (cfg.mode != "off" or cfg.layout == "paper") and num_layers % B != 0:
        lo, hi = num_layers // B * B, (num_layers // B + 1) * B
        divisors = [d for d in range(MIN_STAGES[cfg.mode], num_layers + 1)
                    if num_layers % d == 0 and active % d == 0]
        alt = f", or num_stages in {divisors}" if divisors else ""
        raise _fail(
            "num_layers", num_layers,
            f"not divisible by the {B} decoder stages (num_stages = {S}, layout {cfg.layout!r}): mode "
            f"{cfg.mode!r} averages/copies neighbouring stages key by key, so every decoder stage must "
            "hold the same number of decoder layers",
            f"use num_layers = {lo if lo >= B else hi} or {hi}" + (alt if cfg.layout != "paper" else ""),
        )
    if cfg.mode == "checkfree_plus" and cfg.swap and micro_batches < 2:
        raise _fail(
            "gradient_accumulation_steps", micro_batches,
            "CheckFree+ with swap needs >= 2 micro-batches per step so both the normal and "
            "the swapped stage order occur every step",
            "set gradient_accumulation_steps >= 2 (or train_batch_size accordingly), "
            "or checkfree.swap = false",
        )
    dp = active // S
    for entry in cfg.fail_at:
        stage, _, *replica = entry
        if stage >= S:
            raise _fail(_k("fail_at"), format_fail_entry(entry),
                        f"stage {stage} does not exist with num_stages = {S}",
                        f"use a stage in 0..{S - 1}")
        if replica and replica[0] >= dp:
            raise _fail(_k("fail_at"), format_fail_entry(entry),
                        f"replica {replica[0]} does not exist: {world_size - cfg.spares} training ranks over {S} "
                        f"stages give {dp} data-parallel replica(s)",
                        f"use a replica in 0..{dp - 1}, or write {stage}:{entry[1]} to fail every replica")
    return dp
