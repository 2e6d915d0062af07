"""The ``"checkfree"`` section of a DeepSpeed JSON config, validated up front.

Everything here runs before any process group exists, so a bad config fails in
milliseconds with a message naming the key, the offending value and the fix,
instead of minutes later inside a pipeline rank (torchtitan style: one
dataclass, validation in ``__post_init__``). Each key's own rule (range, closed
set, path) is one entry of ``KEY_RULES``; the rules between keys are methods.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ConfigError",
    "CheckFreeConfig",
    "MODES",
    "RECOVERY_METHODS",
    "GRAD_NORMS",
    "NORM_SCOPES",
    "MIN_STAGES",
]

from ds_checkfree.config.inputs import (ConfigError, Constraint, Invalid, OneOf, Parses, Range, ReadableFile,
                                        WritableDir, check_value)
from ds_checkfree.config.inputs import fail as _fail
from ds_checkfree.config.modes import (CHECKPOINT_RESTORES, CLIP_SCOPES, FAILURE_DRAWS, GRAD_NORMS, LAYOUTS,
                                       LOST_STAGE_RESTORE_MODES, RATE_PRESETS, MIN_STAGES, MIN_STAGES_PAPER, MIN_STAGES_PAPER_WHY, MIN_STAGES_WHY, MODES, NORM_SCOPES,
                    PAPER_LAYOUT_MODES, RECOVERY_METHODS)

SECTION = "checkfree"


def _k(name: str) -> str:
    return f"{SECTION}.{name}"


@functools.cache
def _field_kinds() -> dict[str, tuple[str, bool]]:
    """Expected JSON type per field, (kind, nullable), read from the dataclass annotations."""
    kinds = {}
    for name, hint in typing.get_type_hints(CheckFreeConfig).items():
        args = typing.get_args(hint)
        nullable = type(None) in args
        base = next(a for a in args if a is not type(None)) if nullable else hint
        if typing.get_origin(base) is list:
            kinds[name] = ("list", nullable)  # fail_at: parsed by _validate_fail_at
        else:
            kinds[name] = ({str: "str", int: "int", bool: "bool", float: "float"}[base], nullable)
    return kinds


_TYPE_WORDS = {
    "str": "a string",
    "int": "an integer (not a bool)",
    "bool": "a bool (true/false)",
    "float": "a number (not a bool)",
}


def _check_type(name: str, value: Any) -> Any:
    """Return ``value`` coerced to its field type (int -> float only), or raise."""
    kind, nullable = _field_kinds()[name]
    if value is None and nullable:
        return None
    expected = _TYPE_WORDS.get(kind, "")
    if nullable:
        expected += " or null"
    if kind == "str":
        ok = isinstance(value, str)
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            if not math.isfinite(value):
                raise _fail(_k(name), value, "must be a finite number", "use a finite value")
            value = float(value)
    else:  # fail_at is parsed separately
        return value
    if not ok:
        raise _fail(
            _k(name), value, f"wrong type {type(value).__name__}, expected {expected}",
            f"set {_k(name)} to {expected}",
        )
    return value


_FAIL_AT_FIX = ('write each failure as "STAGE:STEP" (e.g. "2:100", every data-parallel replica of the stage), '
                '"STAGE.REPLICA:STEP" (e.g. "2.1:100", one replica) or [STAGE, STEP] with integers')


def parse_fail_entry(entry: Any) -> tuple[int, ...]:
    """``(stage, step)`` (every replica of the stage fails) or ``(stage, step, replica)``;
    raises ``Invalid`` naming the problem and the fix."""
    replica = None
    if isinstance(entry, str):
        parts = entry.split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            where = parts[0].strip().split(".")
            if len(where) > 2:
                raise ValueError
            stage, step = int(where[0].strip()), int(parts[1].strip())
            if len(where) == 2:
                replica = int(where[1].strip())
        except ValueError:
            raise Invalid("not of the form STAGE:STEP or STAGE.REPLICA:STEP", _FAIL_AT_FIX) from None
    elif isinstance(entry, (list, tuple)):
        if len(entry) != 2 or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in entry
        ):
            raise Invalid("must be a pair of integers [STAGE, STEP]", _FAIL_AT_FIX)
        stage, step = entry
    else:
        raise Invalid(f"wrong type {type(entry).__name__}", _FAIL_AT_FIX)
    if stage < 0:
        raise Invalid(f"stage {stage} is negative", "use a stage index >= 0")
    if step < 1:
        raise Invalid(f"step {step} is < 1 (steps count from 1)", "use a step >= 1")
    if replica is not None and replica < 0:
        raise Invalid(f"replica {replica} is negative",
                      "use a data-parallel replica index >= 0, or STAGE:STEP for every replica")
    return (int(stage), int(step)) if replica is None else (int(stage), int(step), int(replica))


def _parse_fail_entry(idx: int, entry: Any) -> tuple[int, ...]:
    try:
        return parse_fail_entry(entry)
    except Invalid as err:
        raise _fail(f"{_k('fail_at')}[{idx}]", entry, err.problem, err.fix) from None


def _parse_fail_list(raw: Any) -> list[tuple[int, ...]]:
    if not isinstance(raw, (list, tuple)):
        raise Invalid(f"wrong type {type(raw).__name__}, expected a list", 'write a list such as ["2:100", [1, 250]]')
    return sorted({_parse_fail_entry(i, e) for i, e in enumerate(raw)})


def _positive(fix: str) -> tuple[Constraint, str]:
    return Range(0, lo_open=True), fix


def _at_least(lo: int, fix: str) -> tuple[Constraint, str]:
    return Range(lo), fix


#: every key of the section: the constraint its value must meet besides its JSON type (which
#: the annotation gives; None: any value of that type) and the fix. Rules between keys (the
#: mode's minimum stage count, one rate source, the heartbeat timeout against its interval)
#: are the ``_validate_*`` methods below.
KEY_RULES: dict[str, tuple[Constraint | None, str]] = {
    "mode": (OneOf(MODES), 'use "checkfree" (intermediate stages) or "checkfree_plus" (all stages); '
             '"off" is stock DeepSpeed; "redundant" is the Bamboo-style baseline'),
    "num_stages": _at_least(1, "set num_stages to the pipeline's stage count (>= 3 for checkfree)"),
    "swap": (None, "true (CheckFree+ swaps the edge stages) or false"),
    "redundant_forward": (None, "true (Bamboo's redundant forward) or false (the lower bound)"),
    "lr_scale": _positive("set a positive factor such as 1.1 (the paper's default)"),
    "grad_norm": (OneOf(GRAD_NORMS), 'use "post_clip" (the paper) or "pre_clip"'),
    "norm_scope": (OneOf(NORM_SCOPES), 'use "decoder" (the layers being averaged) or "stage" (all parameters)'),
    "epsilon": _positive("set a small positive value such as 1e-4 (the paper's default)"),
    "recovery_method": (OneOf(RECOVERY_METHODS), 'use "weighted_average" (the paper); the others are ablations'),
    "layout": (OneOf(LAYOUTS), 'use "all_stages_fail" (every stage may fail) or "paper" (embedding and head on '
               "their own stages, which never fail)"),
    "stage_copy_every": _at_least(1, "set the steps between refreshes of the in-memory stage copy, e.g. 100 "
                                  "(the reference)"),
    "clip_scope": (OneOf(CLIP_SCOPES), 'use "global" (DeepSpeed) or "stage" (each stage clips its own norm)'),
    "fail_at": (Parses(_parse_fail_list), _FAIL_AT_FIX),
    "failure_rate": (Range(0, 100, what="a percentage per stage per hour"),
                     "use e.g. 5, 10 or 16 (the paper's rates), or 0 to disable"),
    "failure_probability": (Range(0, 1, what="a per-step probability"),
                            "use e.g. 0.002 (the reference's 500M model at 10 %/h), or null"),
    "failure_preset": (OneOf(tuple(RATE_PRESETS)), f"use one of {sorted(RATE_PRESETS)} (model_percent-per-hour), "
                       "or null"),
    "failure_draws": (OneOf(FAILURE_DRAWS), 'use "logical_step" or "executed_step" (redone steps draw too)'),
    "assumed_step_seconds": _positive("set the measured seconds per training step, e.g. 2.5"),
    "failure_seed": (None, "any integer (the draws are seeded by a string of it)"),
    "failure_schedule": (ReadableFile(), "give the path of an existing failure-schedule JSON file, or null"),
    "fallback_checkpoint_dir": (WritableDir(), "give a directory this user can create or write to, or null"),
    "heartbeat_interval_s": _positive("set a positive interval such as 0.5"),
    "heartbeat_timeout_s": _positive("set it well above heartbeat_interval_s, e.g. 10"),
    "data_plane_timeout_s": _positive("set it above the slowest stage's micro-batch time, e.g. 30"),
    "spares": _at_least(0, "set checkfree.spares to 0 or more"),
    "startup_wait_s": _positive("set it above the processes' start-up time (imports, data), e.g. 60"),
    "join_wait_s": _at_least(0, "set checkfree.join_wait_s to 0 or more"),
    "preemption_grace_s": _at_least(0, "set checkfree.preemption_grace_s to 0 or more (0: off)"),
    "checkpoint_every": _at_least(0, "set checkfree.checkpoint_every to 0 or more"),
    "checkpoint_dir": (WritableDir(), "give a directory this user can create or write to"),
    "checkpoint_restore": (OneOf(CHECKPOINT_RESTORES), 'use "global_rollback" (every rank) or "lost_stage" (the '
                           "lost stage alone reloads its stale state)"),
    "storage_bandwidth_mb_s": _positive("set a positive bandwidth in MB/s (e.g. 500), or null"),
}


def format_fail_entry(entry: tuple[int, ...]) -> str:
    """The string form of a parsed ``fail_at`` entry."""
    stage, step, *replica = entry
    return f"{stage}.{replica[0]}:{step}" if replica else f"{stage}:{step}"


def check_against_deepspeed(cf: "CheckFreeConfig", ds_config: dict) -> None:
    """The section's options that depend on the DeepSpeed side of the JSON (run by ``prepare``)."""
    clip = ds_config.get("gradient_clipping", 0.0) or 0.0
    bf16 = any(ds_config.get(k, {}).get("enabled") for k in ("bf16", "bfloat16", "fp16"))
    zero = ds_config.get("zero_optimization", {}).get("stage", 0)
    if cf.clip_scope == "stage" and clip <= 0:
        raise _fail(_k("clip_scope"), cf.clip_scope, f"gradient_clipping = {clip!r}: there is no clip value to "
                    "apply per stage", "set gradient_clipping > 0 (the reference clips at 1.0), or clip_scope "
                    '"global"')
    if cf.clip_scope == "stage" and (bf16 or zero):
        raise _fail(_k("clip_scope"), cf.clip_scope, "per-stage clipping replaces DeepSpeed's fp32 clipping, which "
                    "DeepSpeed's bf16/fp16/ZeRO optimizers bypass (they clip inside their own step)",
                    'use clip_scope "global" with bf16/fp16/ZeRO, or train in fp32 without ZeRO')
    if cf.checkpoint_restore == "lost_stage" and (bf16 or zero):
        raise _fail(_k("checkpoint_restore"), cf.checkpoint_restore, "a lost stage reloads its layer files and its "
                    "torch optimizer state; bf16/fp16 fp32 masters and ZeRO shards are not reloaded that way",
                    'use "global_rollback" with bf16/fp16/ZeRO, or train in fp32 without ZeRO')


@dataclass
class CheckFreeConfig:
    """Validated ``"checkfree"`` section; see the module docstring for why."""

    mode: str = "checkfree"
    num_stages: int = 4
    swap: bool = True  # meaningful only for checkfree_plus (False: replicated layout, normal order)
    # mode "redundant" only: True = Bamboo's redundant forward of the successor on every micro-batch;
    # False = the lower bound (gradients shipped to the shadow, no redundant forward)
    redundant_forward: bool = True
    lr_scale: float = 1.1
    grad_norm: str = "post_clip"
    # which gradients weight a neighbour in the rebuild: its decoder layers only (what it
    # averages), or all its parameters (the edge stages' embedding/head then dominate)
    norm_scope: str = "decoder"
    epsilon: float = 1e-4
    recovery_method: str = "weighted_average"
    # "all_stages_fail": (de)embedding on the first/last decoder stage, every stage may fail;
    # "paper": embedding alone on stage 0, norm + head alone on stage S-1, neither fails
    layout: str = "all_stages_fail"
    # layout "paper", mode checkfree: steps between refreshes of the first/last block stage's
    # in-memory copy (kept on the embedding / head stage; the reference refreshes every 100)
    stage_copy_every: int = 100
    # "global": DeepSpeed clips the pipeline's global gradient norm; "stage": each stage clips
    # its own norm at gradient_clipping (the reference)
    clip_scope: str = "global"
    #: (stage, step) = every replica of the stage; (stage, step, replica) = one replica
    fail_at: list[tuple[int, ...]] = field(default_factory=list)
    failure_rate: float = 0.0  # percent per stage per hour
    # per-stage per-step probability, or a named preset of the reference's (RATE_PRESETS);
    # at most one of failure_rate / failure_probability / failure_preset
    failure_probability: float | None = None
    failure_preset: str | None = None
    # what a rate draw is keyed by: "logical_step" (a redone step never fails again) or
    # "executed_step" (every executed step draws, redone ones included)
    failure_draws: str = "logical_step"
    assumed_step_seconds: float | None = None
    failure_seed: int = 0
    failure_schedule: str | None = None
    fallback_checkpoint_dir: str | None = None
    heartbeat_interval_s: float = 0.5
    heartbeat_timeout_s: float = 10.0
    # elastic launch: the longest a survivor may stay blocked on a silent peer before it
    # joins the recovery anyway (keep it above the slowest stage's micro-batch time)
    data_plane_timeout_s: float = 30.0
    spares: int = 0
    # elastic launch, membership (``ds_checkfree.elastic.membership``): how long the job waits for
    # the processes it was launched with before it starts without the missing ones, and
    # how long it waits for a joining process when a lost stage has no spare (0: stop now)
    startup_wait_s: float = 60.0
    join_wait_s: float = 60.0
    # elastic launch: on SIGTERM (a spot VM's preemption notice) a stage finishes its step and
    # hands its exact state to its replacement, if a step ends within this many seconds (0: off,
    # SIGTERM then ends the process at once and the CheckFree rules rebuild the stage)
    preemption_grace_s: float = 20.0
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    # "global_rollback": every rank reloads the last checkpoint (DeepSpeed practice);
    # "lost_stage": only the lost stage reloads its stale weights + optimizer state (the paper)
    checkpoint_restore: str = "global_rollback"
    storage_bandwidth_mb_s: float | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_type(f.name, getattr(self, f.name)))
        self._validate_choices()
        self._validate_keys()
        self._validate_heartbeat()
        self._validate_fail_at()
        self._validate_rate_source()
        self._validate_dependencies()

    # -- validation, split by concern -------------------------------------------------
    def _validate_choices(self) -> None:
        for name, (rule, fix) in KEY_RULES.items():  # the names first: the rules below read them
            if isinstance(rule, OneOf) and getattr(self, name) is not None:
                check_value(_k(name), getattr(self, name), rule, fix)
        need = MIN_STAGES[self.mode]
        if self.num_stages < need:
            raise _fail(
                _k("num_stages"), self.num_stages,
                f"mode {self.mode!r} needs at least {need} stages: {MIN_STAGES_WHY[self.mode]}",
                f"set num_stages >= {need}" + (
                    ', or use mode "checkfree" / "off"' if self.mode == "checkfree_plus"
                    else ', or use mode "off"' if self.mode == "checkfree" else ""),
            )
        self._validate_layout()

    def _validate_layout(self) -> None:
        if self.layout != "paper":
            return
        if self.mode not in PAPER_LAYOUT_MODES:
            raise _fail(_k("layout"), self.layout, f"not implemented for mode {self.mode!r} (CheckFree+ "
                        "rebuilds the edge stages by swapping them, the paper layout keeps them out of "
                        "failures; the redundant ring is untested with it)",
                        f'use layout "all_stages_fail" with mode {self.mode!r}, or mode "checkfree" / "off"')
        if self.spares:
            raise _fail(_k("layout"), self.layout, f"with checkfree.spares = {self.spares}: the first/last block "
                        "stage's in-memory copy is not carried through a real process death (a joining spare "
                        "would not know when the copies were taken)",
                        'use layout "all_stages_fail" with spares, or spares = 0 (logical failures)')
        if self.num_stages < MIN_STAGES_PAPER:
            raise _fail(_k("num_stages"), self.num_stages,
                        f"layout 'paper' needs at least {MIN_STAGES_PAPER} stages: {MIN_STAGES_PAPER_WHY}",
                        f'set num_stages >= {MIN_STAGES_PAPER}, or layout "all_stages_fail"')

    def _validate_keys(self) -> None:
        """Each key against its own rule in ``KEY_RULES`` (fail_at: ``_validate_fail_at``)."""
        for name, (rule, fix) in KEY_RULES.items():
            value = getattr(self, name)
            if value is not None and rule is not None and not isinstance(rule, (OneOf, Parses)):
                check_value(_k(name), value, rule, fix)

    def _validate_heartbeat(self) -> None:
        if self.heartbeat_timeout_s <= 2 * self.heartbeat_interval_s:
            raise _fail(
                _k("heartbeat_timeout_s"), self.heartbeat_timeout_s,
                f"must be > 2 * heartbeat_interval_s (= {2 * self.heartbeat_interval_s!r}), "
                "or a single late heartbeat declares a live stage dead",
                f"set heartbeat_timeout_s to at least {max(10.0, 4 * self.heartbeat_interval_s)!r}",
            )

    def _validate_rate_source(self) -> None:
        given = [n for n, v in (("failure_rate", self.failure_rate or None), ("failure_probability",
                 self.failure_probability), ("failure_preset", self.failure_preset)) if v is not None]
        if len(given) > 1:
            raise _fail(_k(given[1]), getattr(self, given[1]), f"conflicts with {_k(given[0])} = "
                        f"{getattr(self, given[0])!r}: one rate source at a time",
                        f"keep one of {given} and unset the other(s)")
        if self.failure_probability and self.assumed_step_seconds is None:
            raise _fail(_k("assumed_step_seconds"), None,
                        f"required with checkfree.failure_probability = {self.failure_probability!r}, so the "
                        "rate can be reported as %/h as well as per step",
                        "set assumed_step_seconds to the seconds per training step (e.g. 2.5)")
        if self.failure_draws == "executed_step" and self.spares:
            raise _fail(_k("failure_draws"), self.failure_draws, f"with checkfree.spares = {self.spares}: a spare "
                        "that joins later cannot know how many steps the job executed, so its draws would "
                        "differ from the survivors'", 'use failure_draws "logical_step" with spares')

    def _validate_fail_at(self) -> None:
        try:
            parsed = _parse_fail_list(self.fail_at)
        except Invalid as err:
            raise _fail(_k("fail_at"), self.fail_at, err.problem, err.fix) from None
        for entry in parsed:
            stage = entry[0]
            if stage >= self.num_stages:
                raise _fail(
                    _k("fail_at"), format_fail_entry(entry),
                    f"stage {stage} does not exist with num_stages = {self.num_stages}",
                    f"use a stage in 0..{self.num_stages - 1}",
                )
            if self.layout == "paper" and stage in (0, self.num_stages - 1):
                raise _fail(
                    _k("fail_at"), format_fail_entry(entry),
                    f"stage {stage} holds only the {'embedding' if stage == 0 else 'final norm + LM head'} "
                    "in layout 'paper', which never fails (as in the paper's reference code)",
                    f'fail a decoder stage in 1..{self.num_stages - 2}, or use layout "all_stages_fail"',
                )
        self.fail_at = parsed

    def _validate_dependencies(self) -> None:
        if self.failure_rate > 0 and self.assumed_step_seconds is None:
            raise _fail(
                _k("assumed_step_seconds"), None,
                f"required when checkfree.failure_rate = {self.failure_rate!r} > 0, to turn an "
                "hourly rate into a per-step probability",
                "set assumed_step_seconds to the seconds per training step (e.g. 2.5)",
            )
        if self.checkpoint_restore == "lost_stage" and self.mode not in LOST_STAGE_RESTORE_MODES:
            raise _fail(_k("checkpoint_restore"), self.checkpoint_restore,
                        f"not supported with mode {self.mode!r} (CheckFree+'s tied (de)embedding replicas would "
                        "differ from their live partner; the redundant ring restores exact copies itself)",
                        f'use "global_rollback", or mode in {list(LOST_STAGE_RESTORE_MODES)}')
        if self.checkpoint_restore == "lost_stage" and not (self.checkpoint_dir or self.fallback_checkpoint_dir):
            raise _fail(_k("checkpoint_restore"), self.checkpoint_restore,
                        "a lost stage reloads its own files from a checkpoint, but no checkpoint_dir is set",
                        "set checkpoint_every and checkpoint_dir (or fallback_checkpoint_dir)")
        if self.checkpoint_every > 0 and not self.checkpoint_dir:
            raise _fail(
                _k("checkpoint_dir"), self.checkpoint_dir,
                f"required when checkfree.checkpoint_every = {self.checkpoint_every} > 0",
                "set checkpoint_dir to a writable directory, or checkpoint_every to 0",
            )

    # -- (de)serialisation -----------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict) -> CheckFreeConfig:
        """Build from the JSON section; unknown keys are errors, not silently ignored."""
        if not isinstance(d, dict):
            raise _fail(SECTION, d, f"wrong type {type(d).__name__}, expected a JSON object",
                        'write "checkfree": {"mode": "checkfree", ...}')
        valid = cls.field_names()
        for key in d:
            if key not in valid:
                close = difflib.get_close_matches(str(key), valid, n=1)
                hint = f'did you mean "{close[0]}"? ' if close else ""
                raise ConfigError(
                    f"{_k(str(key))} = {d[key]!r}: unknown key. Fix: {hint}"
                    f"valid keys are {valid}."
                )
        return cls(**d)

    def to_dict(self) -> dict:
        """JSON-serialisable dict that round-trips through :meth:`from_dict`."""
        out = dataclasses.asdict(self)
        out["fail_at"] = [format_fail_entry(e) for e in self.fail_at]
        return out
