"""Worker for the forget-groups test (world size 2, gloo, under torchrun): generation 0 forms
a default group and a subgroup under the store prefix ``gen0/``; the NCCL plane's way out
(abort + forget, nothing shut down) leaves torch.distributed uninitialised with both groups
kept alive; generation 1 then forms under ``gen1/`` in the same processes and works."""
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as tdist

from ds_checkfree.elastic.c10d_private import abort_groups, forget_groups, registered_groups


def form(generation: int, rank: int, size: int):
    store = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                           timeout=timedelta(seconds=60), wait_for_workers=False)
    tdist.init_process_group("gloo", store=tdist.PrefixStore(f"gen{generation}/", store), rank=rank,
                             world_size=size, timeout=timedelta(seconds=60))


def main():
    out = sys.argv[1]
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    form(0, rank, size)
    sub = tdist.new_group([0, 1])
    old_default = tdist.group.WORLD
    before = registered_groups()
    abort_errors = abort_groups(before)
    kept: list = []
    forgotten = forget_groups(kept)
    after_forget = {"initialized": tdist.is_initialized(), "registered": len(registered_groups())}
    # nothing was shut down: the forgotten default group still answers (a shut-down one raises)
    x = torch.tensor([float(rank + 1)])
    old_default.allreduce([x]).wait()
    form(1, rank, size)
    y = torch.tensor([float(rank + 1)])
    tdist.all_reduce(y)
    again = tdist.new_group([0, 1])
    z = torch.tensor([10.0 * (rank + 1)])
    tdist.all_reduce(z, group=again)
    result = {"before": len(before), "default_first": before[0] is old_default, "sub_registered": sub in before,
              "abort_errors": abort_errors, "forgotten": forgotten,
              "kept_are_old": [g is old_default for g in kept].count(True) == 1 and sub in kept,
              "after_forget": after_forget, "old_default_sum": x.item(), "gen1_sum": y.item(),
              "gen1_subgroup_sum": z.item(), "gen1_registered": len(registered_groups()),
              "gen1_default_is_new": tdist.group.WORLD is not old_default}
    tdist.destroy_process_group()
    if rank == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
