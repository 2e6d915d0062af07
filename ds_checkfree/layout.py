"""Which layers live on which pipeline stage, as pure data.

The recovery rules need to know, for every stage, which decoder layers it holds and
whether it carries the (de)embedding or a replica of it. Keeping that as a pure function
of (layers, stages, mode) lets the module, the recovery code and the tests agree without
a process group.
"""
from __future__ import annotations

from dataclasses import dataclass

from .modes import MIN_STAGES

EMBED = "embed"
EMBED_REPLICA = "embed_replica"
DECODER = "decoder"
HEAD = "head"
HEAD_REPLICA = "head_replica"

#: roles skipped on a micro-batch that runs in normal order / in swapped order
SKIP_NORMAL = frozenset({EMBED_REPLICA, HEAD_REPLICA})
SKIP_SWAPPED = frozenset({EMBED, HEAD})


@dataclass(frozen=True)
class Slot:
    """One entry of a stage's layer list: a role and, for decoders, the global layer index."""
    role: str
    decoder: int = -1


def stage_slots(num_layers: int, num_stages: int, mode: str) -> list[list[Slot]]:
    """Per-stage layer lists.

    Every stage holds ``num_layers / num_stages`` consecutive decoder layers (the alignment
    rule that lets neighbours be averaged key by key). Stage 0 adds the embedding in front,
    the last stage the final norm + LM head behind. Under ``checkfree_plus`` stage 1 also
    carries an embedding replica and stage S-2 a norm + head replica.
    """
    if mode not in MIN_STAGES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(MIN_STAGES)}")
    if num_stages < MIN_STAGES[mode]:
        raise ValueError(f"mode {mode!r} needs at least {MIN_STAGES[mode]} stages, got {num_stages}")
    if num_layers < num_stages or num_layers % num_stages:
        raise ValueError(f"{num_layers} decoder layers cannot be split evenly over {num_stages} stages")
    per = num_layers // num_stages
    slots = [[Slot(DECODER, s * per + j) for j in range(per)] for s in range(num_stages)]
    slots[0].insert(0, Slot(EMBED))
    slots[-1].append(Slot(HEAD))
    if mode == "checkfree_plus":
        slots[1].insert(0, Slot(EMBED_REPLICA))
        slots[-2].append(Slot(HEAD_REPLICA))
    return slots


def partition_bounds(slots: list[list[Slot]]) -> list[int]:
    """DeepSpeed's ``parts`` list: stage s owns layer specs ``parts[s]:parts[s+1]``."""
    bounds = [0]
    for stage in slots:
        bounds.append(bounds[-1] + len(stage))
    return bounds


def neighbours(stage: int, num_stages: int) -> tuple[int | None, int | None]:
    """The previous and next stage in normal order (None at the edges)."""
    prev = stage - 1 if stage > 0 else None
    nxt = stage + 1 if stage < num_stages - 1 else None
    return prev, nxt
