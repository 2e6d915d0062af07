"""Worker for the idle-copy test (world size 3, gloo, under torchrun): ranks 0 and 1 form an
idle copy of their pair's group in a background thread while the main thread runs collectives
on generation 0's default group (``c10d_private.form_gloo_group``); generation 0 is left as a
recovery leaves it (``destroy_process_group``) and generation 1 forms; the copy, registered
in generation 1 (``c10d_private.register_group``), then serves collectives and rank queries
like a group ``new_group`` formed. Writes what each rank saw to ``OUT.RANK.json``."""
import json
import os
import sys
import threading
from datetime import timedelta

import torch
import torch.distributed as tdist

from ds_checkfree.elastic.c10d_private import form_gloo_group, register_group

PAIR = (0, 1)


def main():
    out = sys.argv[1]
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    def client():
        return tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=60), wait_for_workers=False)

    tdist.init_process_group("gloo", store=tdist.PrefixStore("gen0/", client()), rank=rank, world_size=size)
    copy = {}

    def form():
        store = tdist.PrefixStore("standby/gen0/0-1/", client())
        copy["group"] = form_gloo_group(store, PAIR.index(rank), len(PAIR), timedelta(seconds=60), "standby0-0-1")
        copy["store"] = store
        copy["registered_while_forming"] = len(tdist.distributed_c10d._world.pg_map)

    thread = threading.Thread(target=form) if rank in PAIR else None
    if thread:
        thread.start()
    x = torch.ones(2) * (rank + 1)
    tdist.all_reduce(x)  # the main thread trains meanwhile
    if thread:
        thread.join()
    groups_gen0 = len(tdist.distributed_c10d._world.pg_map)
    tdist.destroy_process_group()
    tdist.init_process_group("gloo", store=tdist.PrefixStore("gen1/", client()), rank=rank, world_size=size)
    seen = {"default_all_reduce": x[0].item(), "groups_gen0": groups_gen0}
    if rank in PAIR:
        group = copy["group"]
        register_group(group, copy["store"], "standby0-0-1", PAIR)
        y = torch.ones(2) * (rank + 1)
        tdist.all_reduce(y, group=group)
        z = torch.tensor([float(rank)])
        tdist.broadcast(z, src=1, group=group)
        seen.update(registered_while_forming=copy["registered_while_forming"], pair_all_reduce=y[0].item(),
                    broadcast=z.item(), group_rank=tdist.get_rank(group), group_size=tdist.get_world_size(group),
                    global_of_1=tdist.get_global_rank(group, 1))
    w = torch.ones(1)
    tdist.all_reduce(w)  # generation 1's default group works beside the kept copy
    seen["gen1_all_reduce"] = w.item()
    tdist.destroy_process_group()
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    main()
