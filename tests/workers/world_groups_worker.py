"""Worker for the group sharing test (world size 2, gloo): inside ``one_group_per_member_set``
a group of every rank is the default group, a set of members asked for again gets the group
formed the first time, other groups are formed as usual; an elastic-style engine built that
way trains; outside, DeepSpeed's ``new_group`` is its own again. Then the engine's guard against an aborted data plane: with
the abort flag set (as a membership round sets it) a step stops before the optimizer step.
Last, an engine built as a recovery's (``rebuilt=True``) sends no start-up broadcast."""
import json
import sys

import torch

import deepspeed
import deepspeed.comm as ds_comm
import torch.distributed as tdist

from ds_checkfree.elastic import data_plane
from ds_checkfree.data import build_data
from ds_checkfree.pipe.ds_private import one_group_per_member_set
from ds_checkfree.initialize import build


def counting_broadcasts(fn):
    """``fn()`` and how many broadcasts DeepSpeed's communication module sent meanwhile."""
    calls = []
    original = ds_comm.broadcast

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    ds_comm.broadcast = counted
    try:
        return fn(), len(calls)
    finally:
        ds_comm.broadcast = original


def main():
    cfg = json.load(open(sys.argv[1]))
    out = sys.argv[2]
    deepspeed.init_distributed(dist_backend="gloo")
    me = tdist.get_rank()
    original = ds_comm.new_group
    with one_group_per_member_set():
        everyone = ds_comm.new_group([1, 0])
        alone = ds_comm.new_group([me]) if me == 0 else (ds_comm.new_group([0]), ds_comm.new_group([1]))[1]
        alone_again = ds_comm.new_group([me])  # asked for before: the same group, nothing formed
        patched_inside = ds_comm.new_group is not original
    if me == 0:  # every rank creates every group, in the same order
        ds_comm.new_group([1])
    x = torch.tensor([float(me + 1)])
    tdist.all_reduce(x, group=everyone)
    engine, start_broadcasts = counting_broadcasts(lambda: build(cfg, "tiny", {"num_layers": 4}, elastic=True)[0])
    data = build_data(None, 32, engine.train_micro_batch_size_per_gpu(), seed=0)
    losses = [float(engine.train_batch(data.train.iterator(0))) for _ in range(2)]
    grid = engine.grid
    before = {k: p.detach().clone() for k, p in engine.module.named_parameters()}
    steps_before = engine.global_steps
    data_plane._aborted.set()  # what NcclPlane.wake sets before aborting the groups
    try:
        engine.train_batch(data.train.iterator(32))
        aborted = None
    except data_plane.DataPlaneAborted as err:
        aborted = str(err)
    finally:
        data_plane._aborted.clear()
    abort_check = {"raised": aborted, "steps_advanced": engine.global_steps - steps_before,
                   "weights_unchanged": all(torch.equal(before[k], p) for k, p in engine.module.named_parameters())}
    # a recovery's engine: every parameter is replaced right after, so DeepSpeed's start-up
    # broadcast of replica 0's weights is skipped (the first build above sent one per parameter)
    _, rebuilt_broadcasts = counting_broadcasts(
        lambda: build(cfg, "tiny", {"num_layers": 4}, elastic=True, rebuilt=True)[0])
    result = {"start_broadcasts": start_broadcasts, "rebuilt_broadcasts": rebuilt_broadcasts,
              "parameters": len(list(engine.module.parameters())),
              "everyone_is_world": everyone is tdist.group.WORLD, "alone_is_world": alone is tdist.group.WORLD,
              "alone_size": tdist.get_world_size(alone),
              "alone_again_is_alone": alone_again is alone, "patched_inside": patched_inside,
              "restored": ds_comm.new_group is original, "all_reduce": float(x.item()),
              "engine_world_groups": [g is tdist.group.WORLD for g in
                                      (engine.module.world_group, grid.get_model_parallel_group(),
                                                    grid.get_pipe_parallel_group())],
              "engine_dp_group_is_world": grid.get_data_parallel_group() is tdist.group.WORLD,
              "build_seconds": engine.build_seconds, "losses": losses,
              "abort_check": abort_check}
    if me == 0:
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
