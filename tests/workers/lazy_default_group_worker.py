"""Worker for the lazy-default-group test (world size 3, gloo, under torchrun): the default
group formed the way the elastic data plane forms it (``GlooPlane.forming_default_group``)
opens no connection to a peer until a pair first talks; a subgroup formed afterwards is still
a full mesh; a send between ranks 0 and 1 connects only them; collectives on the default
group still work. Writes what each rank saw to ``OUT.RANK.json``."""
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as tdist

from ds_checkfree.elastic.data_plane import GLOO_LAZY_INIT, GlooPlane
from ds_checkfree.elastic.plane_sockets import socket_inodes


def open_sockets() -> set[str]:
    return set(socket_inodes().values())


def tcp_ports(inodes: set[str]) -> list[tuple[int, int]]:
    """(local port, remote port) of each TCP socket among ``inodes`` (remote 0: listening)."""
    wanted = {i[len("socket:["):-1] for i in inodes}
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[9] in wanted:
                ports.append((int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16)))
    return ports


def main():
    out = sys.argv[1]
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                           timeout=timedelta(seconds=60), wait_for_workers=False)
    env_before = os.environ.get(GLOO_LAZY_INIT)
    s0 = open_sockets()
    with GlooPlane().forming_default_group():
        env_inside = os.environ.get(GLOO_LAZY_INIT)
        tdist.init_process_group("gloo", store=tdist.PrefixStore("gen0/", store), rank=rank, world_size=size,
                                 timeout=timedelta(seconds=60))
    s1 = open_sockets()
    sub = tdist.new_group(list(range(size)))  # eager: connects to every other member now
    s2 = open_sockets()
    tdist.barrier(sub)  # every rank's subgroup is formed before anyone talks on the default group
    s3 = open_sockets()
    t = torch.tensor([float(rank + 1)])
    if rank == 0:
        tdist.send(t, 1)
    elif rank == 1:
        tdist.recv(t, 0)
    tdist.barrier(sub)
    s4 = open_sockets()
    total = torch.tensor([float(rank + 1)])
    tdist.all_reduce(total)  # the default group still works as a group of every rank
    sub_total = torch.tensor([float(rank + 1)])
    tdist.all_reduce(sub_total, group=sub)
    result = {
        "env_before": env_before, "env_inside": env_inside, "env_after": os.environ.get(GLOO_LAZY_INIT),
        "default_group_sockets": len(s1 - s0), "subgroup_sockets": len(s2 - s1),
        "p2p_new_sockets": len(s4 - s3), "received": t.item(),
        # a connection between two ranks: one side's new socket whose remote port is a port of
        # the other (another process connecting in, e.g. to a listener, is not one)
        "p2p_new_tcp": tcp_ports(s4 - s3), "local_ports": [lp for lp, _ in tcp_ports(s4)],
        "default_all_reduce": total.item(), "subgroup_all_reduce": sub_total.item(),
    }
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(result, f)
    tdist.barrier(sub)  # every rank's ports are read while all its connections are still open
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
