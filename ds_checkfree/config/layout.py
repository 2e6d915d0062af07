"""Which layers live on which pipeline stage, as pure data.

A model is three parts (``pipe.parts.PipelineParts``): the head (embedding, ...), the run of
repeated blocks that CheckFree averages, and the tail (final norm, LM head). Their roles here
are ``EMBED`` (a head layer), ``DECODER`` (a block) and ``HEAD`` (a tail layer: the LM head's
side). The recovery rules need to know, for every stage, which blocks it holds and whether it
carries the head/tail or a replica of them. Keeping that as a pure function of (blocks,
stages, mode) lets the module, the recovery code and the tests agree without a process group.
"""
from __future__ import annotations

from dataclasses import dataclass

from ds_checkfree.config.modes import LAYOUTS, MIN_STAGES, MIN_STAGES_PAPER, PAPER_LAYOUT_MODES

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
    """One entry of a stage's layer list: a role and the layer's index within its part (for
    blocks the global block number, for head/tail layers the position in the head/tail)."""
    role: str
    index: int = 0


def block_stages(num_stages: int, layout: str = "all_stages_fail") -> list[int]:
    """The stages that hold decoder layers: every stage, or under the paper's layout all but
    the embedding stage 0 and the head stage S-1."""
    return list(range(1, num_stages - 1)) if layout == "paper" else list(range(num_stages))


def never_fail_stages(num_stages: int, layout: str = "all_stages_fail") -> list[int]:
    """Stages excluded from failures: the paper's embedding and head stages (the reference
    code never lets them fail), none otherwise."""
    return [0, num_stages - 1] if layout == "paper" else []


def copy_holders(num_stages: int, layout: str = "all_stages_fail", mode: str = "checkfree") -> dict[int, int]:
    """Block stage -> the never-failing stage that keeps its in-memory copy (paper layout,
    plain CheckFree): the first block stage's copy lives on the embedding stage, the last
    one's on the head stage (with one block stage, on the embedding stage). The reference
    keeps the copy in its single process; here it must live on a stage that survives."""
    if layout != "paper" or mode != "checkfree":
        return {}
    return {num_stages - 2: num_stages - 1, 1: 0}


def stage_slots(num_layers: int, num_stages: int, mode: str, layout: str = "all_stages_fail",
                head_len: int = 1, tail_len: int = 1) -> list[list[Slot]]:
    """Per-stage layer lists.

    Every block stage holds the same number of consecutive blocks (the alignment rule that lets
    neighbours be averaged key by key). Layout ``all_stages_fail``: stage 0 adds the
    ``head_len`` head layers in front, the last stage the ``tail_len`` tail layers behind; under
    ``checkfree_plus`` stage 1 also carries a replica of the head and stage S-2 one of the tail.
    Layout ``paper``: stage 0 holds the head alone, stage S-1 the tail alone, the blocks are
    split over stages 1..S-2.
    """
    if mode not in MIN_STAGES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(MIN_STAGES)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if layout == "paper" and mode not in PAPER_LAYOUT_MODES:
        raise ValueError(f"layout 'paper' is implemented for modes {PAPER_LAYOUT_MODES}, not {mode!r}")
    need = MIN_STAGES_PAPER if layout == "paper" else MIN_STAGES[mode]
    if num_stages < need:
        raise ValueError(f"mode {mode!r} with layout {layout!r} needs at least {need} stages, got {num_stages}")
    blocks = block_stages(num_stages, layout)
    if num_layers < len(blocks) or num_layers % len(blocks):
        raise ValueError(f"{num_layers} blocks (decoder layers) cannot be split evenly over {len(blocks)} block "
                         "stages: CheckFree averages neighbouring stages block by block, so every block stage holds "
                         "the same number")
    per = num_layers // len(blocks)
    slots: list[list[Slot]] = [[] for _ in range(num_stages)]
    for k, s in enumerate(blocks):
        slots[s] = [Slot(DECODER, k * per + j) for j in range(per)]
    slots[0][:0] = [Slot(EMBED, k) for k in range(head_len)]
    slots[-1].extend(Slot(HEAD, k) for k in range(tail_len))
    if mode == "checkfree_plus":
        slots[1][:0] = [Slot(EMBED_REPLICA, k) for k in range(head_len)]
        slots[-2].extend(Slot(HEAD_REPLICA, k) for k in range(tail_len))
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
