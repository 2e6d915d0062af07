"""The CheckFree+ out-of-order pipeline schedule, as pure data.

On every odd micro-batch CheckFree+ runs the first two stages in swapped order and
so do the last two, so stage 1 learns to act as stage 0 and stage S-2 as stage S-1.
Activations and gradients then travel between non-adjacent stages (0 -> 3 for S=4),
which DeepSpeed's ``TrainSchedule`` cannot express.

How the schedule is built, and why it cannot deadlock: a tick-based simulation of
all stages produces ONE global sequence of actions, in which every point-to-point
transfer is a single atomic action shared by its sender and its receiver. Each
stage's instruction list is the projection of that sequence onto the stage (a
transfer becomes ``SendXTo`` on the sender and ``RecvXFrom`` on the receiver). The
global sequence itself is an execution in which every blocking send meets its
receive, so the projections are deadlock-free under rendezvous semantics.
``schedule_check.check_schedule`` verifies this (and the data flow) by simulating all stages
together, independently of how the lists were made.
"""

from __future__ import annotations

import functools
from collections import Counter

from deepspeed.runtime.pipe.schedule import (
    BufferOpInstruction,
    OptimizerStep,
    PipeInstruction,
    PipeSchedule,
    ReduceGrads,
    ReduceTiedGrads,
)

from ds_checkfree.config.modes import MIN_STAGES_FOR_SWAP

__all__ = [
    "BackwardRouted",
    "ForwardRouted",
    "LoadRoutedMicroBatch",
    "OutOfOrderSchedule",
    "RecvActivationFrom",
    "RecvGradFrom",
    "ScheduleError",
    "SendActivationTo",
    "SendGradTo",
    "build_all",
    "message_stats",
    "stage_route",
]


class ScheduleError(RuntimeError):
    """A per-stage instruction plan that would deadlock or compute the wrong thing."""


# --------------------------------------------------------------------------- routes


def stage_route(micro_batch: int, num_stages: int, swap: bool) -> list[int]:
    """Stages that process ``micro_batch``, in forward order.

    Odd micro-batches swap (0, 1) and (S-2, S-1) when ``swap`` is on; the two pairs
    must be disjoint, hence at least 4 stages.
    """
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if micro_batch < 0:
        raise ValueError(f"micro_batch must be >= 0, got {micro_batch}")
    if swap and num_stages < MIN_STAGES_FOR_SWAP:
        raise ValueError(
            f"the CheckFree+ swap needs two disjoint stage pairs, i.e. num_stages >= "
            f"{MIN_STAGES_FOR_SWAP}, got {num_stages}; use swap=False (plain CheckFree) "
            f"or more stages")
    route = list(range(num_stages))
    if swap and micro_batch % 2 == 1:
        route[0], route[1] = route[1], route[0]
        route[-2], route[-1] = route[-1], route[-2]
    return route


# --------------------------------------------------------------------- instructions


class LoadRoutedMicroBatch(BufferOpInstruction):
    """Pull micro-batch ``micro_batch`` from the data iterator (every stage, every micro-batch,
    so all iterators stay in sync); keep ``inputs`` only on the route's first stage and
    ``labels`` only on its last."""


class ForwardRouted(BufferOpInstruction):
    """Forward of ``micro_batch`` on this stage; ``first`` starts the route (embedding from
    the loaded inputs), ``computes_loss`` ends it (head + loss); ``swapped`` marks the
    swapped route."""


class BackwardRouted(BufferOpInstruction):
    """Backward of ``micro_batch``; ``computes_loss`` starts it from the loss, otherwise from
    the received gradient; ``first`` means no input gradient has to be sent on."""


class SendActivationTo(BufferOpInstruction):
    """Blocking send of this stage's output activation of ``micro_batch`` to stage ``peer``."""


class RecvActivationFrom(BufferOpInstruction):
    """Blocking receive of the input activation of ``micro_batch`` from stage ``peer``."""


class SendGradTo(BufferOpInstruction):
    """Blocking send of the gradient w.r.t. this stage's input of ``micro_batch`` to ``peer``."""


class RecvGradFrom(BufferOpInstruction):
    """Blocking receive of the gradient w.r.t. this stage's output of ``micro_batch``."""


_SENDS = (SendActivationTo, SendGradTo)
_RECVS = (RecvActivationFrom, RecvGradFrom)
_COMM = _SENDS + _RECVS
_MATCHING_RECV = {SendActivationTo: RecvActivationFrom, SendGradTo: RecvGradFrom}
_FINAL = (ReduceTiedGrads, ReduceGrads, OptimizerStep)

# Compact, immutable form of an instruction: (kind, micro_batch, *args). The cached plan
# holds these, so every caller of build_all() gets fresh, unshared instruction objects.
_KINDS = {
    "load": (LoadRoutedMicroBatch, ("inputs", "labels")),
    "fwd": (ForwardRouted, ("swapped", "first", "computes_loss")),
    "bwd": (BackwardRouted, ("computes_loss", "first")),
    "send_act": (SendActivationTo, ("peer", )),
    "recv_act": (RecvActivationFrom, ("peer", )),
    "send_grad": (SendGradTo, ("peer", )),
    "recv_grad": (RecvGradFrom, ("peer", )),
}


def _materialize(op):
    cls, names = _KINDS[op[0]]
    micro_batch = op[1]
    return cls(buffer_id=micro_batch, micro_batch=micro_batch, **dict(zip(names, op[2:])))


# --------------------------------------------------------------------------- builder


def _validate(num_stages, micro_batches, swap):
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    stage_route(0, num_stages, swap)  # raises for swap with too few stages


def _chain(num_stages: int, micro_batch: int, swap: bool):
    """The 2S computes of one micro-batch in dependency order, as (stage, kind, position)."""
    route = stage_route(micro_batch, num_stages, swap)
    return ([(route[k], "fwd", k) for k in range(num_stages)] +
            [(route[k], "bwd", k) for k in reversed(range(num_stages))])


_PERIOD = 4  # ticks per (even, odd) pair in steady state: every stage busy every tick
_MAX_WAIT = 3  # idle ticks allowed before one compute of the pair timetable


@functools.lru_cache(maxsize=None)
def _pair_timetable(num_stages: int):
    """Steady-state CheckFree+ timetable of one (even, odd) micro-batch pair: per chain
    (even, odd), the tick offset of each compute of :func:`_chain`.

    Why: greedy lowest-micro-batch-first scheduling does not reach 1F1B throughput once
    middle stages separate the swapped pairs (S=8, M=32: 87 ticks vs 78). Pair ``j``
    runs at ``4j + offset``, so each stage's four computes of a pair must fall on
    distinct ticks mod 4. With S >= 6 this forces some wait ticks in the swapped pairs
    (the middle stages need the odd chain two ticks after the even one, forward and
    backward, which the back pair cannot keep without waiting); the depth-first search
    finds the timetable with the earliest last backward, allowing waits only on the
    swapped pairs and their neighbours so its cost does not grow with S.
    """
    S = num_stages
    chains = [_chain(S, 0, True), _chain(S, 1, True)]
    waits_at = {0, 1, 2, S - 3, S - 2, S - 1}

    def place(c, i, t, used, offsets, bound):
        """Offsets of chains[c][i:], then of the odd chain; None if none fit in bound."""
        if i == len(chains[c]):
            if c == 1:
                return list(offsets)
            return place(1, 0, 1, used, offsets, bound)  # odd chain: from tick 1 on
        stage = chains[c][i][0]
        span = _MAX_WAIT + 1 if stage in waits_at else 1
        for tick in range(t, t + span):
            if tick + len(chains[c]) - 1 - i > bound:
                break
            if (stage, tick % _PERIOD) in used:
                continue
            used.add((stage, tick % _PERIOD))
            offsets.append(tick)
            found = place(c, i + 1, tick + 1, used, offsets, bound)
            used.discard((stage, tick % _PERIOD))
            offsets.pop()
            if found is not None:
                return found
        return None

    for bound in range(2 * S, 2 * S + 4 * _MAX_WAIT):
        found = place(0, 0, 0, set(), [], bound)
        if found is not None:
            return tuple(found[:2 * S]), tuple(found[2 * S:])
    raise AssertionError(f"no periodic CheckFree+ timetable for {S} stages")  # bug guard


@functools.lru_cache(maxsize=64)
def _plan(num_stages: int, micro_batches: int, swap: bool):
    """Tick simulation of all stages -> per stage, per tick, a tuple of compact ops.

    Each tick, every stage runs at most one ready compute (a bounded number of
    micro-batches in flight per stage), then every output produced in that tick is
    transferred. A transfer is one global action appended to both the sender's and the
    receiver's step of that tick, in the same global order, which is what makes the
    projection deadlock-free.

    Which ready compute: without the swap, backward before forward, lowest micro-batch
    first (exactly 1F1B, S in flight). With the swap, the one due earliest in the
    periodic :func:`_pair_timetable` (earliest-due-date list scheduling): it keeps the
    1F1B rate in steady state and, unlike replaying the timetable's fixed order, lets
    the fill and drain run ahead of it. S + 1 in flight is what the timetable needs; at
    S = 4 the two pairs cover the whole pipe, stay in lockstep, and S suffices.
    """
    S, M = num_stages, micro_batches
    routes = [stage_route(m, S, swap) for m in range(M)]
    pos = [{s: k for k, s in enumerate(r)} for r in routes]
    fwd_tick = [[None] * S for _ in range(M)]  # tick at which position k of m finished forward
    bwd_tick = [[None] * S for _ in range(M)]
    loaded = [0] * S  # next micro-batch each stage will load
    in_flight = [0] * S
    if swap:
        due = {}
        for m in range(M):
            offsets = _pair_timetable(S)[m % 2]
            for (_, kind, k), offset in zip(_chain(S, m, True), offsets):
                due[kind, m, k] = _PERIOD * (m // 2) + offset
        priority = lambda kind, m, k: (due[kind, m, k], kind == "fwd", m)  # noqa: E731
        limit = S + 1 if S > MIN_STAGES_FOR_SWAP else S
    else:
        priority = lambda kind, m, k: (kind == "fwd", m)  # noqa: E731
        limit = S
    steps = [[] for _ in range(S)]
    remaining = 2 * S * M
    t = 0

    def fwd_ready(m, k):
        return k == 0 or (fwd_tick[m][k - 1] is not None and fwd_tick[m][k - 1] < t)

    def bwd_ready(m, k):
        if fwd_tick[m][k] is None:
            return False
        if k == S - 1:
            return fwd_tick[m][k] < t
        return bwd_tick[m][k + 1] is not None and bwd_tick[m][k + 1] < t

    while remaining:
        # The oldest unfinished micro-batch may always move forward, even past the
        # in-flight bound: it guarantees progress every tick.
        oldest = next(m for m in range(M) if bwd_tick[m][0] is None)
        computes = []
        for s in range(S):
            ready = []
            for m in range(M):
                k = pos[m][s]
                if bwd_tick[m][k] is None and bwd_ready(m, k):
                    ready.append(("bwd", m, k))
                elif (fwd_tick[m][k] is None and fwd_ready(m, k)
                      and (in_flight[s] < limit or m == oldest)):
                    ready.append(("fwd", m, k))
            step = []
            steps[s].append(step)
            if not ready:
                continue
            kind, m, k = min(ready, key=lambda c: priority(*c))
            route = routes[m]
            first, last = k == 0, k == S - 1
            if kind == "fwd":
                while loaded[s] <= m:
                    mm = loaded[s]
                    step.append(("load", mm, routes[mm][0] == s, routes[mm][-1] == s))
                    loaded[s] += 1
                step.append(("fwd", m, swap and m % 2 == 1, first, last))
                in_flight[s] += 1
                if not last:
                    computes.append(("act", m, s, route[k + 1]))
            else:
                step.append(("bwd", m, last, first))
                in_flight[s] -= 1
                if not first:
                    computes.append(("grad", m, s, route[k - 1]))
            computes_tick = (fwd_tick if kind == "fwd" else bwd_tick)
            computes_tick[m][k] = t
            remaining -= 1
        if not any(steps[s][t] for s in range(S)):
            raise AssertionError(f"schedule builder made no progress at tick {t}")  # bug guard
        for kind, m, src, dst in computes:  # global order: by sender stage
            steps[src][t].append(("send_" + kind, m, dst))
            steps[dst][t].append(("recv_" + kind, m, src))
        t += 1
    return tuple(tuple(tuple(step) for step in stage_steps) for stage_steps in steps)


def _final_step():
    return [ReduceTiedGrads(), ReduceGrads(), OptimizerStep()]


def _build_stage(num_stages, micro_batches, swap, stage):
    plan = _plan(num_stages, micro_batches, bool(swap))[stage]
    return [[_materialize(op) for op in step] for step in plan] + [_final_step()]


def build_all(num_stages: int, micro_batches: int, swap: bool) -> list[list[list[PipeInstruction]]]:
    """Per stage, the list of steps (one per simulation tick, plus a final step with
    ReduceTiedGrads, ReduceGrads, OptimizerStep). Idle ticks are empty steps, so step
    ``t`` of every stage belongs to the same tick."""
    _validate(num_stages, micro_batches, swap)
    return [_build_stage(num_stages, micro_batches, swap, s) for s in range(num_stages)]


class OutOfOrderSchedule(PipeSchedule):
    """DeepSpeed ``PipeSchedule`` that yields this stage's steps of :func:`build_all`."""

    def __init__(self, micro_batches, stages, stage_id, swap=True):
        super().__init__(micro_batches, stages, stage_id)
        _validate(stages, micro_batches, swap)
        if not self._valid_stage(stage_id):
            raise ValueError(f"stage_id must be in [0, {stages}), got {stage_id}")
        self.swap = bool(swap)

    def steps(self):
        yield from _build_stage(self.stages, self.micro_batches, self.swap, self.stage_id)

    def num_pipe_buffers(self):
        """One buffer per micro-batch: ``buffer_id == micro_batch`` (stages see them out of order)."""
        return self.micro_batches


# --------------------------------------------------------------------------- stats


def message_stats(num_stages, micro_batches, swap) -> dict:
    """Point-to-point traffic of one training step, counted from the built schedule:
    what the swap costs in messages between non-adjacent stages and in hop distance."""
    act = grad = non_adj = distance = max_hop = 0
    pairs = Counter()
    for s, steps in enumerate(build_all(num_stages, micro_batches, swap)):
        for step in steps:
            for instr in step:
                if isinstance(instr, _SENDS):
                    hop = abs(instr.peer - s)
                    act += isinstance(instr, SendActivationTo)
                    grad += isinstance(instr, SendGradTo)
                    non_adj += hop != 1
                    distance += hop
                    max_hop = max(max_hop, hop)
                    pairs[(s, instr.peer)] += 1
    return {
        "total": act + grad,
        "activations": act,
        "grads": grad,
        "non_adjacent": non_adj,
        "total_hops": distance,
        "max_hop": max_hop,
        "pairs": dict(sorted(pairs.items())),
    }
