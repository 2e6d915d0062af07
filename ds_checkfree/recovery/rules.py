"""Pure recovery rules and math: which lost stage is rebuilt from what, and how.

``plan_recovery`` decides (no tensors, no processes); ``combine`` builds the new weights
of one stage from its sources' state dicts. The engine applies the result (fresh optimizer
state, scaled learning rate) and does the communication.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import Tensor

from ds_checkfree.config.layout import copy_holders
from ds_checkfree.config.modes import CHECKPOINT_RESTORES, LAYOUTS, MIN_STAGES, MIN_STAGES_PAPER, MODES, PAPER_LAYOUT_MODES
from ds_checkfree.config.modes import RECOVERY_METHODS as METHODS

#: methods ``combine`` knows (everything that builds weights; "checkpoint" loads them instead)
COMBINE_METHODS = METHODS + ("copy",)
#: methods that install state from elsewhere instead of combining neighbours:
#: "stage_copy" (the in-memory copy kept on a never-failing stage, layout "paper") and
#: "checkpoint_stage" (the lost stage alone reloads its stale state from the last checkpoint)
RESTORE_METHODS = ("stage_copy", "checkpoint_stage")

_FALLBACK_HINT = "set checkfree.fallback_checkpoint_dir to roll back to the last checkpoint instead"


class UnrecoverableFailure(RuntimeError):
    """Lost stages that no rule can rebuild and no checkpoint can restore."""


@dataclass(frozen=True)
class RecoveryAction:
    """Rebuild ``stage`` with ``method`` from the (alive) stages in ``sources``.

    ``replica`` is None for a rule that rebuilds every data-parallel replica of the stage
    (each replica from the same replica of its sources); for ``method == "replica"`` it is
    the lost replica, restored by an exact copy of replica ``source_replica`` of the same stage."""
    stage: int
    method: str
    sources: tuple[int, ...]
    replica: int | None = None
    source_replica: int | None = None


def _intermediate_action(stage: int, method: str) -> RecoveryAction:
    if method in ("weighted_average", "mean"):
        return RecoveryAction(stage, method, (stage - 1, stage + 1))
    if method == "copy_prev":
        return RecoveryAction(stage, method, (stage - 1,))
    if method == "copy_next":
        return RecoveryAction(stage, method, (stage + 1,))
    return RecoveryAction(stage, "random", ())


def _neighbour_reason(stage: int, lost: set[int]) -> str | None:
    """Why intermediate ``stage`` cannot be rebuilt from its neighbours, or None if it can."""
    dead = [n for n in (stage - 1, stage + 1) if n in lost]
    if not dead:
        return None
    group = sorted({stage, *dead})
    names = ", ".join(map(str, group[:-1])) + f" and {group[-1]}"
    if len(dead) == 1:
        return f"stages {names} are adjacent: stage {stage}'s neighbour {dead[0]} is lost too"
    return f"stages {names} are adjacent: stage {stage}'s neighbours {dead[0]} and {dead[1]} are lost too"


def _paper_reason(stage: int, num_stages: int, lost: set[int]) -> str | None:
    """Why ``stage`` cannot be restored under the paper layout, or None (then: its copy, or
    for a middle block stage the neighbour rule decides)."""
    if stage in (0, num_stages - 1):
        what = "embedding" if stage == 0 else "final norm + LM head"
        return (f"stage {stage} holds only the {what} in layout 'paper', which has no rebuild rule "
                "(the paper's layout never lets it fail)")
    holder = copy_holders(num_stages, "paper", "checkfree").get(stage)
    if holder is not None and holder in lost:
        return f"stage {stage}'s in-memory copy lived on stage {holder}, which is lost too"
    return None


def plan_recovery(
    lost: Iterable[int],
    num_stages: int,
    mode: str,
    method: str = "weighted_average",
    has_checkpoint: bool = False,
    layout: str = "all_stages_fail",
    checkpoint_restore: str = "global_rollback",
) -> list[RecoveryAction]:
    """One action per lost stage, sorted by stage.

    Intermediate stages are rebuilt from their two neighbours, which must both be alive
    whatever the method (so the ablations recover exactly the same failures as the
    paper's rule). Under ``checkfree_plus`` the swap pairs (0, 1) and (S-2, S-1) copy each
    other. If any lost stage cannot be rebuilt, the whole loss is rolled back to the
    checkpoint (all-or-nothing: stages rebuilt from step t next to stages restored from
    step t-k would be inconsistent), or ``UnrecoverableFailure`` is raised. With
    ``checkpoint_restore="lost_stage"`` nobody rolls back: each stage without a rule reloads
    its own stale state (method ``checkpoint_stage``) and the others keep their rule.

    Layout ``paper`` (plain CheckFree): stages 0 and S-1 hold only the embedding / the head
    and have no rule (they never fail by design); the first and last block stages (1 and
    S-2) are restored alone from their in-memory copy (method ``stage_copy``, source: the
    stage that holds the copy); the block stages between them are averaged as usual.
    """
    if mode not in MODES:
        raise ValueError(f"unknown checkfree mode {mode!r}; expected one of {MODES}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if layout == "paper" and (mode not in PAPER_LAYOUT_MODES or num_stages < MIN_STAGES_PAPER):
        raise ValueError(f"layout 'paper' needs a mode in {PAPER_LAYOUT_MODES} and >= {MIN_STAGES_PAPER} stages, "
                         f"got {mode!r} with {num_stages}")
    if checkpoint_restore not in CHECKPOINT_RESTORES:
        raise ValueError(f"unknown checkpoint_restore {checkpoint_restore!r}; expected one of {CHECKPOINT_RESTORES}")
    if method not in METHODS:
        raise ValueError(f"unknown recovery method {method!r}; expected one of {METHODS}")
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be an integer >= 1, got {num_stages!r}")
    if num_stages < MIN_STAGES[mode]:
        raise ValueError(f"mode {mode!r} needs at least {MIN_STAGES[mode]} stages, got {num_stages}")
    lost_set = set()
    for stage in lost:
        if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < num_stages:
            raise ValueError(f"lost stage {stage!r} is out of range [0, {num_stages - 1}]")
        lost_set.add(stage)
    if not lost_set:
        return []

    last = num_stages - 1
    holders = copy_holders(num_stages, layout, mode)
    actions: list[RecoveryAction] = []
    reasons: dict[int, str] = {}
    for stage in sorted(lost_set):
        if mode == "off":
            reasons[stage] = f"stage {stage} has no rebuild rule with checkfree mode 'off'"
            continue
        if mode == "redundant":  # Bamboo-style: the predecessor (in a ring) holds an exact shadow copy
            holder = (stage - 1) % num_stages
            if holder in lost_set:
                reasons[stage] = (f"stages {holder} and {stage} are adjacent in the ring: stage {stage}'s "
                                  f"shadow copy lived on stage {holder}, which is lost too")
            else:
                actions.append(RecoveryAction(stage, "redundant", (holder,)))
            continue
        if layout == "paper" and mode == "checkfree":
            why = _paper_reason(stage, num_stages, lost_set)
            if why is None and stage in holders:
                actions.append(RecoveryAction(stage, "stage_copy", (holders[stage],)))
                continue
            if why is not None:
                reasons[stage] = why
                continue
        if mode == "checkfree_plus":
            partner = {0: 1, 1: 0, last: last - 1, last - 1: last}.get(stage)
            if partner is not None:
                if partner in lost_set:
                    a, b = sorted((stage, partner))
                    reasons[stage] = (f"stages {a} and {b} are a CheckFree+ swap pair and both are lost: "
                                      f"stage {stage}'s copy source {partner} is gone")
                else:
                    actions.append(RecoveryAction(stage, "copy", (partner,)))
                continue
        if stage == 0:
            reasons[stage] = ("stage 0 is the first stage: plain CheckFree has no rule for it "
                              "(use checkfree_plus or set checkfree.fallback_checkpoint_dir)")
            continue
        if stage == last:
            reasons[stage] = (f"stage {stage} is the last stage: plain CheckFree has no rule for it "
                              "(use checkfree_plus or set checkfree.fallback_checkpoint_dir)")
            continue
        why = _neighbour_reason(stage, lost_set)
        if why is not None:
            reasons[stage] = why
        else:
            actions.append(_intermediate_action(stage, method))

    if not reasons:
        return actions
    if has_checkpoint and checkpoint_restore == "lost_stage":
        return sorted(actions + [RecoveryAction(stage, "checkpoint_stage", ()) for stage in reasons],
                      key=lambda a: a.stage)
    if has_checkpoint:
        return [RecoveryAction(stage, "checkpoint", ()) for stage in sorted(lost_set)]
    lines = [f"cannot recover lost stages {sorted(lost_set)} (mode {mode!r}, {num_stages} stages) "
             "and no checkpoint is configured:"]
    for stage in sorted(lost_set):
        lines.append(f"  - {reasons.get(stage, f'stage {stage} could be rebuilt, but a rollback is all-or-nothing')}")
    if mode == "off":
        lines.append("fix: use checkfree mode 'checkfree' or 'checkfree_plus', or " + _FALLBACK_HINT)
    else:
        lines.append("fix: " + _FALLBACK_HINT
                     + ("" if mode in ("checkfree_plus", "redundant") else
                        ", or use mode 'checkfree_plus' if the first or last stage may fail"))
    raise UnrecoverableFailure("\n".join(lines))


def plan_replicated_recovery(
    lost: Iterable[tuple[int, int]],
    num_stages: int,
    dp_size: int,
    mode: str,
    method: str = "weighted_average",
    has_checkpoint: bool = False,
    layout: str = "all_stages_fail",
    checkpoint_restore: str = "global_rollback",
) -> list[RecoveryAction]:
    """Recovery with data parallelism: ``lost`` holds ``(stage, replica)`` pairs.

    A stage that keeps at least one live replica restores each lost replica by an exact copy
    of its lowest live replica (method ``"replica"``: weights, optimizer state, gradient norms
    and learning-rate factor, so the replicas stay identical; no convergence cost, whatever
    the mode). Only a stage whose every replica is lost (a whole column) goes through the
    CheckFree / CheckFree+ rules of ``plan_recovery``, with the replica copies counted as
    alive (they run first). If those rules roll back to a checkpoint, every rank rolls back
    and the copies are moot: only the checkpoint actions are returned.
    """
    if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
        raise ValueError(f"dp_size must be an integer >= 1, got {dp_size!r}")
    by_stage: dict[int, set[int]] = {}
    for pair in lost:
        stage, replica = pair
        if isinstance(replica, bool) or not isinstance(replica, int) or not 0 <= replica < dp_size:
            raise ValueError(f"lost replica {replica!r} of stage {stage!r} is out of range [0, {dp_size - 1}]")
        by_stage.setdefault(stage, set()).add(replica)
    whole = sorted(s for s, reps in by_stage.items() if len(reps) == dp_size)
    columns = plan_recovery(whole, num_stages, mode, method=method, has_checkpoint=has_checkpoint, layout=layout,
                            checkpoint_restore=checkpoint_restore)
    if any(a.method == "checkpoint" for a in columns):
        return columns
    copies = []
    for stage in sorted(set(by_stage) - set(whole)):
        if not (isinstance(stage, int) and not isinstance(stage, bool) and 0 <= stage < num_stages):
            raise ValueError(f"lost stage {stage!r} is out of range [0, {num_stages - 1}]")
        twin = min(set(range(dp_size)) - by_stage[stage])
        copies += [RecoveryAction(stage, "replica", (stage,), replica=r, source_replica=twin)
                   for r in sorted(by_stage[stage])]
    return copies + columns


def _check_norm(name: str, value: float) -> float:
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def gradient_weights(prev_norm: float, next_norm: float, eps: float = 1e-4) -> tuple[float, float]:
    """``(b, a) = (||g_prev|| + eps, ||g_next|| + eps)``: the paper's weights of prev and next.

    A neighbour that was still learning fast (large gradient) gets more say; eps keeps
    the average defined when both norms are zero.
    """
    eps = float(eps)
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    return _check_norm("prev_norm", prev_norm) + eps, _check_norm("next_norm", next_norm) + eps


def _check_same_layout(a: Mapping[str, Tensor], b: Mapping[str, Tensor], a_name: str, b_name: str) -> None:
    """Keys and shapes must match exactly: averaging misaligned layers is silently wrong."""
    for key in list(a) + [k for k in b if k not in a]:
        if key not in b:
            raise ValueError(f"key {key!r} mismatch: {a_name} has shape {tuple(a[key].shape)}, "
                             f"{b_name} has no such key")
        if key not in a:
            raise ValueError(f"key {key!r} mismatch: {a_name} has no such key, "
                             f"{b_name} has shape {tuple(b[key].shape)}")
        if a[key].shape != b[key].shape:
            raise ValueError(f"key {key!r} shape mismatch: {a_name} {tuple(a[key].shape)} "
                             f"vs {b_name} {tuple(b[key].shape)}")


def weighted_average(
    prev: Mapping[str, Tensor],
    nxt: Mapping[str, Tensor],
    prev_weight: float,
    next_weight: float,
) -> dict[str, Tensor]:
    """``(next_weight * nxt + prev_weight * prev) / (prev_weight + next_weight)`` key by key.

    Computed in float64 and cast back to each tensor's dtype, so bf16/fp16 stages lose no
    more precision than one rounding. Non-floating tensors (integer buffers) must agree
    and are copied.
    """
    pw, nw = float(prev_weight), float(next_weight)
    if not (math.isfinite(pw) and math.isfinite(nw)) or pw < 0 or nw < 0 or pw + nw <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not both 0, got prev={prev_weight!r}, next={next_weight!r}")
    _check_same_layout(prev, nxt, "prev", "next")
    out: dict[str, Tensor] = {}
    for key, p in prev.items():
        n = nxt[key]
        if p.dtype != n.dtype:
            raise ValueError(f"key {key!r} dtype mismatch: prev {p.dtype} vs next {n.dtype}")
        if not (p.is_floating_point() or p.is_complex()):
            if not torch.equal(p, n.to(p.device)):
                raise ValueError(f"key {key!r}: non-floating tensors ({p.dtype}) differ and cannot be averaged")
            out[key] = p.detach().clone()
            continue
        wide = torch.complex128 if p.is_complex() else torch.float64
        mixed = (nw * n.detach().to(p.device, wide) + pw * p.detach().to(wide)) / (pw + nw)
        out[key] = mixed.to(p.dtype)
    return out


def _random_init(template: Mapping[str, Tensor], generator: torch.Generator | None, init_std: float) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, t in template.items():
        device = torch.device("cpu") if t.device.type == "meta" else t.device
        if not t.is_floating_point():
            out[key] = t.detach().clone().to(device)
        elif t.dim() >= 2:
            fresh = torch.empty(t.shape, dtype=torch.float32).normal_(0.0, init_std, generator=generator)
            out[key] = fresh.to(device=device, dtype=t.dtype)
        elif t.dim() == 1 and fnmatch.fnmatch(key, "*norm*weight"):
            out[key] = torch.ones(t.shape, dtype=t.dtype, device=device)
        else:
            out[key] = torch.zeros(t.shape, dtype=t.dtype, device=device)
    return out


def combine(
    method: str,
    sources_weights: list[Mapping[str, Tensor]],
    norms: list[float],
    eps: float,
    template: Mapping[str, Tensor],
    generator: torch.Generator | None,
    init_std: float = 0.02,
) -> tuple[dict[str, Tensor], list[float]]:
    """New state dict for a lost stage, and the weight given to each source.

    ``sources_weights`` follow the action's ``sources`` order ((prev, next) for the
    averaging methods). ``template`` is the lost stage's own layout: every source must
    match it key for key, so a partition mismatch fails loudly instead of loading garbage.
    ``norms`` (prev, next gradient norms) are used by ``weighted_average`` only.
    """
    expected = {"weighted_average": 2, "mean": 2, "copy_prev": 1, "copy_next": 1, "copy": 1, "random": 0}
    if method not in expected:
        raise ValueError(f"combine cannot build weights with method {method!r}; expected one of {COMBINE_METHODS}")
    if len(sources_weights) != expected[method]:
        raise ValueError(f"method {method!r} needs {expected[method]} source state dict(s), got {len(sources_weights)}")
    for i, src in enumerate(sources_weights):
        _check_same_layout(template, src, "lost stage", f"source {i}")

    if method == "weighted_average":
        if len(norms) != 2:
            raise ValueError(f"weighted_average needs 2 gradient norms (prev, next), got {len(norms)}")
        b, a = gradient_weights(norms[0], norms[1], eps)
        return weighted_average(sources_weights[0], sources_weights[1], b, a), [b, a]
    if method == "mean":
        return weighted_average(sources_weights[0], sources_weights[1], 0.5, 0.5), [0.5, 0.5]
    if method == "random":
        if not math.isfinite(init_std) or init_std < 0:
            raise ValueError(f"init_std must be a finite number >= 0, got {init_std!r}")
        return _random_init(template, generator, init_std), []
    src = sources_weights[0]
    return {k: v.detach().clone() for k, v in src.items()}, [1.0]
