"""The out-of-order schedule: routes, deadlock-freedom over a grid, a checker that
catches broken plans, real pipelining, and the DeepSpeed PipeSchedule interface."""

import pytest
from deepspeed.runtime.pipe.schedule import (
    OptimizerStep,
    PipeInstruction,
    PipeSchedule,
    ReduceGrads,
    ReduceTiedGrads,
)

from ds_checkfree.pipe.schedule_check import check_schedule
from ds_checkfree.pipe.schedule import (
    BackwardRouted,
    ForwardRouted,
    LoadRoutedMicroBatch,
    OutOfOrderSchedule,
    RecvActivationFrom,
    RecvGradFrom,
    ScheduleError,
    SendActivationTo,
    SendGradTo,
    _pair_timetable,
    _plan,
    build_all,
    message_stats,
    stage_route,
)

MICRO_BATCHES = [1, 2, 3, 4, 7, 8]
GRID = ([(s, m, False) for s in (1, 2, 3, 4, 5, 6, 8) for m in MICRO_BATCHES] +
        [(s, m, True) for s in (4, 5, 6, 8) for m in MICRO_BATCHES])


def flat(steps):
    return [i for step in steps for i in step]


def setarg(instr, **kw):
    """Change an instruction the way the engine sees it: it runs handler(**cmd.kwargs)."""
    instr.kwargs.update(kw)
    for k, v in kw.items():
        setattr(instr, k, v)


def find(instrs, cls, **kw):
    """Index of the first instruction of type cls whose attributes match kw."""
    for idx, instr in enumerate(instrs):
        if type(instr) is cls and all(getattr(instr, k) == v for k, v in kw.items()):
            return idx
    raise LookupError(f"no {cls.__name__} with {kw}")


# ----------------------------------------------------------------------------- routes


def test_routes():
    assert stage_route(0, 4, True) == [0, 1, 2, 3]
    assert stage_route(1, 4, True) == [1, 0, 3, 2]
    assert stage_route(3, 5, True) == [1, 0, 2, 4, 3]
    assert stage_route(2, 5, True) == [0, 1, 2, 3, 4]
    assert stage_route(1, 6, True) == [1, 0, 2, 3, 5, 4]
    assert stage_route(7, 8, True) == [1, 0, 2, 3, 4, 5, 7, 6]
    assert stage_route(6, 8, True) == list(range(8))
    assert stage_route(5, 8, False) == list(range(8))
    assert stage_route(1, 1, False) == [0]


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_swap_needs_four_stages(stages):
    with pytest.raises(ValueError, match="num_stages >= 4"):
        stage_route(0, stages, True)
    with pytest.raises(ValueError):
        build_all(stages, 4, True)
    with pytest.raises(ValueError):
        OutOfOrderSchedule(4, stages, 0, swap=True)


def test_bad_sizes():
    with pytest.raises(ValueError):
        build_all(4, 0, False)
    with pytest.raises(ValueError):
        build_all(0, 4, False)
    with pytest.raises(ValueError):
        OutOfOrderSchedule(4, 4, 4, swap=False)


# ----------------------------------------------------------------------- builder+check


@pytest.mark.parametrize("stages,micro_batches,swap", GRID)
def test_build_all_passes_checker(stages, micro_batches, swap):
    per_stage = build_all(stages, micro_batches, swap)
    stats = check_schedule(per_stage, stages, micro_batches, swap)
    assert stats["messages"] == 2 * micro_batches * (stages - 1)
    # Steps are ticks: aligned across stages, collectives alone in the last one.
    assert len({len(steps) for steps in per_stage}) == 1
    for steps in per_stage:
        assert [type(i) for i in steps[-1]] == [ReduceTiedGrads, ReduceGrads, OptimizerStep]
    if not swap:
        assert stats["non_adjacent_messages"] == 0
        # Exactly the 1F1B makespan and memory bound with unit-time forward and backward.
        assert stats["rounds"] == 2 * micro_batches + 2 * (stages - 1)
        assert max(stats["max_buffers_in_flight"]) <= stages
    else:
        assert stats["rounds"] < 2 * stages * micro_batches or micro_batches == 1
        assert max(stats["max_buffers_in_flight"]) <= stages + 3


def stock_rounds(stages, micro_batches):
    return check_schedule(build_all(stages, micro_batches, False), stages, micro_batches, False)["rounds"]


# The stage counts CheckFree+ is run at, with the micro-batch counts of the benchmarks.
MAKESPAN_GRID = [(s, m) for s in (5, 6, 7, 8) for m in sorted({s, 2 * s, 4 * s, 8, 16, 32})]


@pytest.mark.parametrize("stages,micro_batches", MAKESPAN_GRID)
def test_swap_makespan_close_to_1f1b(stages, micro_batches):
    """CheckFree+ must not cost more than 5% over stock 1F1B; the builder reaches one tick."""
    per_stage = build_all(stages, micro_batches, True)
    stats = check_schedule(per_stage, stages, micro_batches, True)  # pairing, no deadlock, data flow
    stock = stock_rounds(stages, micro_batches)
    assert stats["rounds"] <= 1.05 * stock
    assert stats["rounds"] <= stock + 1
    assert stats["messages"] == 2 * micro_batches * (stages - 1)
    assert len({len(steps) for steps in per_stage}) == 1
    # S + 1 micro-batches between forward and backward, plus one received activation.
    assert max(stats["max_buffers_in_flight"]) <= stages + 2


@pytest.mark.parametrize("stages,micro_batches", [(10, 20), (12, 8), (16, 32)])
def test_swap_makespan_longer_pipelines(stages, micro_batches):
    stats = check_schedule(build_all(stages, micro_batches, True), stages, micro_batches, True)
    assert stats["rounds"] <= stock_rounds(stages, micro_batches) + 1


def test_four_stage_swap_keeps_lockstep():
    """At S=4 the two swapped pairs cover the pipe: two ticks faster than 1F1B, S buffers."""
    for micro_batches in (4, 8, 16, 32):
        stats = check_schedule(build_all(4, micro_batches, True), 4, micro_batches, True)
        assert stats["rounds"] == stock_rounds(4, micro_batches) - 2
        assert max(stats["max_buffers_in_flight"]) == 4


@pytest.mark.parametrize("stages", range(4, 13))
def test_pair_timetable_is_a_periodic_schedule(stages):
    """Pair j at 4j + offset: each stage's four computes of a pair on distinct ticks mod 4,
    each chain in dependency order along its route, and at most two ticks of waiting."""
    even, odd = _pair_timetable(stages)
    ticks = {}
    for parity, offsets in ((0, even), (1, odd)):
        route = stage_route(parity, stages, True)
        chain = route + route[::-1]  # forwards along the route, then backwards
        assert len(offsets) == len(chain) == 2 * stages
        assert all(b > a for a, b in zip(offsets, offsets[1:]))
        for stage, offset in zip(chain, offsets):
            ticks.setdefault(stage, []).append(offset % 4)
    assert all(sorted(t) == [0, 1, 2, 3] for t in ticks.values())
    assert min(even[0], odd[0]) >= 0
    assert max(even[-1], odd[-1]) <= 2 * stages + 3  # 1F1B's pair ends at 2S + 1


def test_schedule_is_deterministic():
    first = [[[repr(i) for i in step] for step in steps] for steps in build_all(6, 12, True)]
    _plan.cache_clear()
    _pair_timetable.cache_clear()
    again = [[[repr(i) for i in step] for step in steps] for steps in build_all(6, 12, True)]
    assert first == again


def test_no_communication_with_one_stage():
    (steps, ) = build_all(1, 3, False)
    kinds = [type(i) for i in flat(steps)]
    assert not {SendActivationTo, RecvActivationFrom, SendGradTo, RecvGradFrom} & set(kinds)
    assert kinds.count(ForwardRouted) == kinds.count(BackwardRouted) == 3
    assert all(i.first and i.computes_loss for i in flat(steps) if isinstance(i, ForwardRouted))


def test_flags_on_swapped_route():
    per_stage = [flat(s) for s in build_all(4, 2, True)]
    # micro-batch 1 runs 1 -> 0 -> 3 -> 2: stage 1 embeds, stage 2 computes the loss.
    load1 = [instrs[find(instrs, LoadRoutedMicroBatch, micro_batch=1)] for instrs in per_stage]
    assert [(i.inputs, i.labels) for i in load1] == [(False, False), (True, False), (False, True),
                                                      (False, False)]
    fwd1 = [instrs[find(instrs, ForwardRouted, micro_batch=1)] for instrs in per_stage]
    assert all(i.swapped for i in fwd1)
    assert [(i.first, i.computes_loss) for i in fwd1] == [(False, False), (True, False), (False, True),
                                                          (False, False)]
    fwd0 = [instrs[find(instrs, ForwardRouted, micro_batch=0)] for instrs in per_stage]
    assert not any(i.swapped for i in fwd0)
    assert [(i.first, i.computes_loss) for i in fwd0] == [(True, False), (False, False),
                                                          (False, False), (False, True)]
    # Activation of micro-batch 1 goes 0 -> 3, gradient 3 -> 0.
    assert per_stage[0][find(per_stage[0], SendActivationTo, micro_batch=1)].peer == 3
    assert per_stage[3][find(per_stage[3], SendGradTo, micro_batch=1)].peer == 0
    # Every stage loads every micro-batch, in order, each before its forward.
    for instrs in per_stage:
        loads = [i.micro_batch for i in instrs if isinstance(i, LoadRoutedMicroBatch)]
        assert loads == [0, 1]
        for m in (0, 1):
            assert find(instrs, LoadRoutedMicroBatch, micro_batch=m) < find(instrs, ForwardRouted, micro_batch=m)
        assert all(i.buffer_id == i.micro_batch for i in instrs if hasattr(i, "micro_batch"))


def test_pipelining_is_real():
    stats = check_schedule(build_all(4, 8, False), 4, 8, False)
    sequential = 4 * 8 * 2
    assert stats["rounds"] == 22
    assert stats["rounds"] < sequential / 2
    swapped = check_schedule(build_all(4, 8, True), 4, 8, True)
    assert swapped["rounds"] <= stats["rounds"]


def test_build_all_returns_fresh_objects():
    first = build_all(4, 4, True)
    first[0][0].clear()
    setarg(first[1][0][0], micro_batch=99)
    again = build_all(4, 4, True)
    check_schedule(again, 4, 4, True)


# ------------------------------------------------------------------ checker mutations


def mutated(stages, micro_batches, swap):
    """Flat per-stage lists, free to mutate."""
    return [flat(s) for s in build_all(stages, micro_batches, swap)]


def check(lists, stages, micro_batches, swap, match):
    with pytest.raises(ScheduleError, match=match):
        check_schedule(lists, stages, micro_batches, swap)


def test_catches_two_way_send_deadlock():
    lists = mutated(2, 1, False)
    # Stage 1 sends its gradient before receiving the activation; stage 0 is sending too.
    send = lists[1].pop(find(lists[1], SendGradTo, micro_batch=0))
    lists[1].insert(0, send)
    check(lists, 2, 1, False, r"deadlock.*stage 0 blocked at #\d+ SendActivationTo.*stage 1 blocked")


def test_catches_swapped_comm_deadlock():
    lists = mutated(4, 8, False)
    s0 = lists[0]
    a = find(s0, SendActivationTo, micro_batch=0)
    b = find(s0, RecvGradFrom, micro_batch=0)
    s0[a], s0[b] = s0[b], s0[a]
    check(lists, 4, 8, False, r"deadlock.*stage 0 blocked at #\d+ RecvGradFrom")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_catches_swapped_comm_on_swap_schedule(stage):
    lists = mutated(4, 8, True)
    comms = [i for i, x in enumerate(lists[stage]) if isinstance(x, (SendActivationTo, RecvActivationFrom,
                                                                      SendGradTo, RecvGradFrom))]
    a, b = comms[1], comms[-2]
    lists[stage][a], lists[stage][b] = lists[stage][b], lists[stage][a]
    check(lists, 4, 8, True, None)


def test_catches_dropped_backward():
    lists = mutated(4, 8, True)
    del lists[2][find(lists[2], BackwardRouted, micro_batch=3)]
    check(lists, 4, 8, True, "gradient sent before the sender's backward|no backward")


def test_catches_dropped_backward_on_route_start():
    lists = mutated(4, 8, True)
    del lists[1][find(lists[1], BackwardRouted, micro_batch=5)]  # stage 1 starts odd routes
    check(lists, 4, 8, True, r"stage 1: no backward for micro-batches \[5\]")


def test_catches_changed_peer():
    lists = mutated(4, 8, True)
    setarg(lists[0][find(lists[0], SendActivationTo, micro_batch=1)], peer=2)
    check(lists, 4, 8, True, "deadlock|mismatch|does not follow route")


def test_catches_changed_peer_on_both_sides():
    # Pairing is consistent (0 sends to 2, 2 receives from 0) but 0 -> 2 skips stage 1.
    lists = mutated(4, 1, False)
    setarg(lists[0][find(lists[0], SendActivationTo, micro_batch=0)], peer=2)
    setarg(lists[2][find(lists[2], RecvActivationFrom, micro_batch=0)], peer=0)
    check(lists, 4, 1, False, r"activation of micro-batch 0 does not follow route \[0, 1, 2, 3\]")


def test_checks_kwargs_not_attributes():
    # The engine executes cmd.kwargs; a peer changed only there must still be caught.
    lists = mutated(4, 1, False)
    lists[0][find(lists[0], SendActivationTo, micro_batch=0)].kwargs["peer"] = 3
    check(lists, 4, 1, False, "deadlock")
    lists = mutated(4, 1, False)
    del lists[2][find(lists[2], ForwardRouted, micro_batch=0)].kwargs["first"]
    check(lists, 4, 1, False, r"missing kwargs \['first'\]")


def test_catches_duplicate_forward():
    lists = mutated(4, 8, True)
    idx = find(lists[1], ForwardRouted, micro_batch=2)
    lists[1].insert(idx + 1, lists[1][idx])
    check(lists, 4, 8, True, "duplicate forward of micro-batch 2")


def test_catches_early_optimizer_step():
    lists = mutated(4, 8, True)
    step = lists[2].pop()
    lists[2].insert(5, step)
    check(lists, 4, 8, True, "stage 2: list must end with ReduceTiedGrads, ReduceGrads, OptimizerStep")


def test_catches_missing_and_reordered_collectives():
    lists = mutated(4, 2, False)
    lists[3].pop()
    check(lists, 4, 2, False, "must end with")
    lists = mutated(4, 2, False)
    lists[0][-3], lists[0][-2] = lists[0][-2], lists[0][-3]
    check(lists, 4, 2, False, "must end with")


def test_catches_forward_before_activation():
    lists = mutated(2, 1, False)
    recv = lists[1].pop(find(lists[1], RecvActivationFrom, micro_batch=0))
    lists[1].insert(find(lists[1], ForwardRouted, micro_batch=0) + 1, recv)
    check(lists, 2, 1, False, "forward before its activation was received from stage 0")


def test_catches_backward_before_grad():
    lists = mutated(3, 2, False)
    recv = lists[1].pop(find(lists[1], RecvGradFrom, micro_batch=1))
    lists[1].insert(find(lists[1], BackwardRouted, micro_batch=1) + 1, recv)
    check(lists, 3, 2, False, "backward before its gradient was received from stage 2")


def test_catches_wrong_route():
    # A plain pipeline checked as if micro-batch 1 had to take the swapped route.
    check(mutated(4, 2, False), 4, 2, True, "wrong Load flags for route \\[1, 0, 3, 2\\]")


def test_catches_send_recv_mismatch():
    lists = mutated(4, 4, False)
    recv = lists[1][find(lists[1], RecvActivationFrom, micro_batch=0)]
    setarg(recv, micro_batch=1, buffer_id=1)
    check(lists, 4, 4, False, "send/recv mismatch")


def test_catches_wrong_load_flags():
    lists = mutated(4, 2, True)
    setarg(lists[1][find(lists[1], LoadRoutedMicroBatch, micro_batch=1)], inputs=False)
    check(lists, 4, 2, True, "wrong Load flags")


def test_catches_wrong_loss_flags():
    lists = mutated(4, 2, True)
    setarg(lists[3][find(lists[3], ForwardRouted, micro_batch=1)], computes_loss=True)
    check(lists, 4, 2, True, "computes_loss=False")


def test_catches_backward_before_forward():
    lists = mutated(1, 2, False)
    f = find(lists[0], ForwardRouted, micro_batch=1)
    b = find(lists[0], BackwardRouted, micro_batch=1)
    lists[0][f], lists[0][b] = lists[0][b], lists[0][f]
    check(lists, 1, 2, False, "backward before its forward")


# ------------------------------------------------------------------ DeepSpeed interface


@pytest.mark.parametrize("stages,micro_batches,swap", [(4, 8, True), (5, 3, True), (3, 4, False)])
def test_out_of_order_schedule_matches_build_all(stages, micro_batches, swap):
    expected = build_all(stages, micro_batches, swap)
    for stage in range(stages):
        sched = OutOfOrderSchedule(micro_batches, stages, stage, swap=swap)
        assert isinstance(sched, PipeSchedule)
        assert sched.num_pipe_buffers() == micro_batches
        assert sched.stage == stage and sched.num_stages == stages
        got = list(sched)
        assert [[repr(i) for i in step] for step in got] == [[repr(i) for i in step] for step in expected[stage]]
        assert all(isinstance(i, PipeInstruction) for step in got for i in step)
        # The engine calls its handler with **cmd.kwargs: buffer ids index the buffers.
        for i in flat(got):
            if "buffer_id" in i.kwargs:
                assert 0 <= i.kwargs["buffer_id"] < sched.num_pipe_buffers()
        assert [[repr(i) for i in step] for step in sched] == [[repr(i) for i in step] for step in got]


def test_schedule_defaults_to_swap():
    assert OutOfOrderSchedule(4, 4, 0).swap is True


# -------------------------------------------------------------------------- msg stats


def test_message_stats_by_hand():
    plain = message_stats(4, 8, False)
    # 8 micro-batches x 3 hops x (activation + gradient), all between neighbours.
    assert plain["total"] == 48 and plain["activations"] == 24 and plain["grads"] == 24
    assert plain["non_adjacent"] == 0 and plain["total_hops"] == 48 and plain["max_hop"] == 1
    assert plain["pairs"] == {(0, 1): 8, (1, 2): 8, (2, 3): 8, (1, 0): 8, (2, 1): 8, (3, 2): 8}

    swapped = message_stats(4, 8, True)
    # Odd micro-batches (4) go 1 -> 0 -> 3 -> 2: one 3-hop message each way.
    assert swapped["total"] == 48
    assert swapped["non_adjacent"] == 4 * 2
    assert swapped["total_hops"] == 4 * 3 * 2 + 4 * (1 + 3 + 1) * 2
    assert swapped["max_hop"] == 3
    assert swapped["pairs"] == {
        (0, 1): 4 + 4,  # even activations, odd gradients 0 -> 1
        (1, 0): 4 + 4,  # odd activations, even gradients
        (1, 2): 4, (2, 1): 4,  # even micro-batches only
        (2, 3): 4 + 4,  # even activations, odd gradients 2 -> 3
        (3, 2): 4 + 4,
        (0, 3): 4, (3, 0): 4,  # odd micro-batches, the long hop
    }


def test_message_stats_longer_pipeline():
    # S=6: odd micro-batches 1,0,2,3,5,4 have two 2-hop messages each way.
    stats = message_stats(6, 8, True)
    assert stats["total"] == 2 * 8 * 5
    assert stats["non_adjacent"] == 4 * 2 * 2
    assert stats["max_hop"] == 2
