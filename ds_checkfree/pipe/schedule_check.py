"""The all-rank checker of pipeline schedules: schedules are data, proved before they run.

``check_schedule`` executes every stage's instruction list together, with blocking
rendezvous send/recv, and checks deadlock-freedom, pairing, one forward and one backward
per micro-batch per stage, and the data flow against ``schedule.stage_route``. It is kept
apart from the builder (``schedule.py``) on purpose: it shares no construction code with
it, so a bug in the builder cannot hide in the checker too.
"""
from __future__ import annotations

from collections import Counter

from deepspeed.runtime.pipe.schedule import PipeInstruction

from ds_checkfree.pipe.schedule import (
    _COMM,
    _FINAL,
    _KINDS,
    _MATCHING_RECV,
    _RECVS,
    _SENDS,
    BackwardRouted,
    ForwardRouted,
    LoadRoutedMicroBatch,
    ScheduleError,
    SendActivationTo,
    _validate,
    stage_route,
)

__all__ = ["check_schedule"]


def _flatten(stage_list):
    out = []
    for item in stage_list:
        if isinstance(item, PipeInstruction):
            out.append(item)
        else:
            out.extend(item)
    return out


_REQUIRED = {cls: ("buffer_id", "micro_batch") + names for cls, names in _KINDS.values()}


def _as_executed(instr):
    """Rebuild an instruction from its ``kwargs``: the engine runs ``handler(**cmd.kwargs)``,
    so that, not the attributes (which can drift), is what must be checked."""
    if type(instr) in _REQUIRED:
        return type(instr)(**instr.kwargs) if "buffer_id" in instr.kwargs else instr
    return instr


def _fmt(stage, idx, instr):
    return f"stage {stage} instruction #{idx} {instr!r}"


def check_schedule(per_stage, num_stages: int, micro_batches: int, swap: bool) -> dict:
    """Execute all stages' lists together with blocking rendezvous send/recv and check
    deadlock-freedom, pairing and data flow against :func:`stage_route`.

    ``per_stage[s]`` is stage ``s``'s list of steps (or a flat instruction list). Each
    round, every stage runs local instructions and at most one compute, then all
    transfers that can rendezvous happen; ``rounds`` is therefore the makespan in
    compute ticks. Raises :class:`ScheduleError` on the first violation.
    """
    S, M = num_stages, micro_batches
    _validate(S, M, swap)
    if len(per_stage) != S:
        raise ScheduleError(f"expected instruction lists for {S} stages, got {len(per_stage)}")
    routes = [stage_route(m, S, swap) for m in range(M)]
    pos = [{s: k for k, s in enumerate(r)} for r in routes]
    lists = [[_as_executed(i) for i in _flatten(x)] for x in per_stage]

    # Static: the collectives close every list, in DeepSpeed's order, and appear nowhere else.
    for s, instrs in enumerate(lists):
        tail = [type(i) for i in instrs[-3:]]
        if tail != list(_FINAL):
            raise ScheduleError(
                f"stage {s}: list must end with ReduceTiedGrads, ReduceGrads, OptimizerStep; "
                f"it ends with {[i.name for i in instrs[-3:]]}")
        for idx, instr in enumerate(instrs[:-3]):
            if isinstance(instr, _FINAL):
                raise ScheduleError(f"{_fmt(s, idx, instr)}: collective before the end of the list "
                                    f"(must be after all point-to-point work)")
        for idx, instr in enumerate(instrs[:-3]):
            if type(instr) not in _REQUIRED:
                raise ScheduleError(f"{_fmt(s, idx, instr)}: unknown instruction type")
            missing = [k for k in _REQUIRED[type(instr)] if k not in instr.kwargs]
            if missing:
                raise ScheduleError(f"{_fmt(s, idx, instr)}: missing kwargs {missing}")
            m = getattr(instr, "micro_batch", None)
            if not isinstance(m, int) or not 0 <= m < M:
                raise ScheduleError(f"{_fmt(s, idx, instr)}: micro_batch must be in [0, {M})")
            if instr.buffer_id != m:
                raise ScheduleError(f"{_fmt(s, idx, instr)}: buffer_id must equal micro_batch")
            if isinstance(instr, _COMM):
                peer = instr.peer
                if not isinstance(peer, int) or not 0 <= peer < S or peer == s:
                    raise ScheduleError(f"{_fmt(s, idx, instr)}: invalid peer stage {peer!r}")

    pc = [0] * S
    loaded = [0] * S
    fwd_done = [set() for _ in range(S)]
    bwd_done = [set() for _ in range(S)]
    act_in = [set() for _ in range(S)]
    grad_in = [set() for _ in range(S)]
    live = [set() for _ in range(S)]
    max_live = [0] * S
    loss_count = Counter()
    messages = non_adjacent = 0
    rounds = 0

    def head(s):
        return lists[s][pc[s]] if pc[s] < len(lists[s]) else None

    def run_local(s, instr):
        """Execute a Load / Forward / Backward on stage s, checking it against the route."""
        idx = pc[s]
        m = instr.micro_batch
        k = pos[m][s]
        route = routes[m]
        is_first, is_last = k == 0, k == S - 1
        where = _fmt(s, idx, instr)
        if isinstance(instr, LoadRoutedMicroBatch):
            if m != loaded[s]:
                raise ScheduleError(f"{where}: loads must cover micro-batches 0..{M - 1} in order; "
                                    f"expected micro_batch {loaded[s]}")
            if (bool(instr.inputs), bool(instr.labels)) != (is_first, is_last):
                raise ScheduleError(f"{where}: wrong Load flags for route {route}: expected "
                                    f"inputs={is_first}, labels={is_last}")
            loaded[s] += 1
        elif isinstance(instr, ForwardRouted):
            if m in fwd_done[s]:
                raise ScheduleError(f"{where}: duplicate forward of micro-batch {m}")
            if m >= loaded[s]:
                raise ScheduleError(f"{where}: forward before micro-batch {m} was loaded on this stage")
            if bool(instr.first) != is_first or bool(instr.computes_loss) != is_last:
                raise ScheduleError(f"{where}: wrong flags for route {route}: expected "
                                    f"first={is_first}, computes_loss={is_last}")
            if bool(instr.swapped) != (swap and m % 2 == 1):
                raise ScheduleError(f"{where}: swapped must be {swap and m % 2 == 1}")
            if not is_first and m not in act_in[s]:
                raise ScheduleError(f"{where}: forward before its activation was received "
                                    f"from stage {route[k - 1]}")
            fwd_done[s].add(m)
            live[s].add(m)
            max_live[s] = max(max_live[s], len(live[s]))
            if instr.computes_loss:
                loss_count[m] += 1
        elif isinstance(instr, BackwardRouted):
            if m in bwd_done[s]:
                raise ScheduleError(f"{where}: duplicate backward of micro-batch {m}")
            if m not in fwd_done[s]:
                raise ScheduleError(f"{where}: backward before its forward")
            if bool(instr.first) != is_first or bool(instr.computes_loss) != is_last:
                raise ScheduleError(f"{where}: wrong flags for route {route}: expected "
                                    f"first={is_first}, computes_loss={is_last}")
            if not is_last and m not in grad_in[s]:
                raise ScheduleError(f"{where}: backward before its gradient was received "
                                    f"from stage {route[k + 1]}")
            bwd_done[s].add(m)
            live[s].discard(m)
        pc[s] += 1

    def transfer(src, dst, send, recv):
        """Rendezvous of send (on src) and recv (on dst): check pairing and the route."""
        nonlocal messages, non_adjacent
        where = f"{_fmt(src, pc[src], send)} <-> {_fmt(dst, pc[dst], recv)}"
        if type(recv) is not _MATCHING_RECV[type(send)] or recv.micro_batch != send.micro_batch:
            raise ScheduleError(f"send/recv mismatch: {where}")
        m = send.micro_batch
        route = routes[m]
        forward = isinstance(send, SendActivationTo)
        what, hop, sender_done, received, direction = (
            ("activation", 1, fwd_done, act_in, "") if forward else
            ("gradient", -1, bwd_done, grad_in, " backwards"))
        if pos[m][dst] != pos[m][src] + hop:
            raise ScheduleError(f"{where}: {what} of micro-batch {m} does not follow "
                                f"route {route}{direction}")
        if m not in sender_done[src]:
            raise ScheduleError(f"{where}: {what} sent before the sender's "
                                f"{'forward' if forward else 'backward'}")
        if m in received[dst]:
            raise ScheduleError(f"{where}: {what} received twice")
        received[dst].add(m)
        if forward:
            live[dst].add(m)
            max_live[dst] = max(max_live[dst], len(live[dst]))
        messages += 1
        non_adjacent += abs(src - dst) != 1
        pc[src] += 1
        pc[dst] += 1

    while any(head(s) is not None for s in range(S)):
        rounds += 1
        progress = False
        # Phase 1: local work, at most one compute per stage.
        for s in range(S):
            computed = False
            while True:
                instr = head(s)
                if isinstance(instr, LoadRoutedMicroBatch):
                    run_local(s, instr)
                elif isinstance(instr, (ForwardRouted, BackwardRouted)) and not computed:
                    run_local(s, instr)
                    computed = True
                else:
                    break
                progress = True
        # Phase 2: rendezvous transfers (and loads uncovered by them) until nothing moves.
        moved = True
        while moved:
            moved = False
            for s in range(S):
                instr = head(s)
                if isinstance(instr, LoadRoutedMicroBatch):
                    run_local(s, instr)
                    moved = True
                elif isinstance(instr, _SENDS):
                    other = head(instr.peer)
                    if isinstance(other, _COMM) and other.peer == s and isinstance(other, _RECVS):
                        transfer(s, instr.peer, instr, other)
                        moved = True
            heads = [head(s) for s in range(S)]
            if all(isinstance(h, _FINAL) for h in heads):
                if len({type(h) for h in heads}) != 1:
                    raise ScheduleError(f"collective mismatch across stages: {[h.name for h in heads]}")
                for s in range(S):
                    pc[s] += 1
                moved = True
            progress = progress or moved
        if not progress:
            pending = "; ".join(
                f"stage {s} blocked at #{pc[s]} {head(s)!r}" if head(s) is not None else f"stage {s} done"
                for s in range(S))
            raise ScheduleError(f"deadlock in round {rounds}: {pending}")

    for s in range(S):
        for name, done in (("forward", fwd_done[s]), ("backward", bwd_done[s])):
            missing = sorted(set(range(M)) - done)
            if missing:
                raise ScheduleError(f"stage {s}: no {name} for micro-batches {missing}")
        if loaded[s] != M:
            raise ScheduleError(f"stage {s}: loaded {loaded[s]} micro-batches, expected {M}")
    bad_loss = {m: loss_count[m] for m in range(M) if loss_count[m] != 1}
    if bad_loss:
        raise ScheduleError(f"loss must be computed exactly once per micro-batch: {bad_loss}")
    return {
        "rounds": rounds,
        "messages": messages,
        "non_adjacent_messages": non_adjacent,
        "max_buffers_in_flight": max_live,
        "bubble_fraction": 1.0 - (2 * M) / rounds,
    }
