"""Worker for the wake-blocked test (2 ranks, gloo, under torchrun): rank 0 blocks on a peer
that stalls (rank 1 stops itself with SIGSTOP), the plane is woken as a round opening wakes
it, and rank 0 must leave its wait at once, leave the generation and form the next.

- generation 0: rank 1 posts a receive of 64 MB and stops; rank 0 sends: the data fills the
  socket buffers and the rest of the send sits in gloo's transmit queue, the op gloo leaves
  stranded when the connection breaks (``plane_waits``).
- generation 1: rank 1 stops before an all-reduce; rank 0 blocks in it.
- generation 2: both all-reduce; rank 0 then waits for the old groups to be dropped.
rank 0 writes what it saw to the JSON file named by argv[1]."""
import json
import os
import signal
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as tdist

from ds_checkfree.elastic.data_plane import GlooPlane

ELEMENTS = 16 * 1024 * 1024  # 64 MB of fp32: far more than loopback's socket buffers
GLOO_TIMEOUT_S = 8.0


def form(plane, store, generation: int, rank: int) -> None:
    plane.prepare()
    tdist.init_process_group("gloo", store=tdist.PrefixStore(f"gen{generation}/", store), rank=rank, world_size=2,
                             timeout=timedelta(seconds=GLOO_TIMEOUT_S))


def state(pid: int) -> str:
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]


def blocked_then_woken(plane, pid1: int, op) -> dict:
    """Run ``op`` while rank 1 is stopped; wake the plane 1 s in; how the wait ended."""
    deadline = time.time() + 30
    while state(pid1) != "T":
        if time.time() > deadline:
            raise SystemExit("rank 1 did not stop")
        time.sleep(0.01)
    woke = {}

    def wake():
        time.sleep(1.0)
        woke["at"] = time.monotonic()
        plane.wake()
    threading.Thread(target=wake, daemon=True).start()
    t0 = time.monotonic()
    try:
        op()
        out = {"raised": None}
    except Exception as err:  # noqa: BLE001 - what ended the wait is the result
        out = {"raised": type(err).__name__, "message": str(err).splitlines()[0][:200]}
    ended = time.monotonic()
    out.update(blocked_s=round(ended - t0, 3), wake_to_raise_s=round(ended - woke.get("at", t0), 3))
    t_leave = time.monotonic()
    plane.leave()
    out["leave_s"] = round(time.monotonic() - t_leave, 3)
    os.kill(pid1, signal.SIGCONT)
    return out


def main():
    out_path = sys.argv[1]
    rank = int(os.environ["RANK"])
    # the member's store client exists before its data plane (as ``ElasticWorld.shared_store``)
    store = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                           timeout=timedelta(seconds=60), wait_for_workers=False)
    plane = GlooPlane()
    form(plane, store, 0, rank)
    if rank == 1:
        store.set("rank1_pid", str(os.getpid()))
        buf = torch.empty(ELEMENTS)
        tdist.irecv(buf, src=0)  # posted: rank 0's send goes straight to the socket
        time.sleep(0.5)          # the ready notice reaches rank 0
        os.kill(os.getpid(), signal.SIGSTOP)
        plane.leave()
        form(plane, store, 1, rank)
        os.kill(os.getpid(), signal.SIGSTOP)  # before the all-reduce rank 0 blocks in
        plane.leave()
        form(plane, store, 2, rank)
        tdist.all_reduce(torch.ones(1))
        tdist.destroy_process_group()
        return
    pid1 = int(store.get("rank1_pid"))
    result = {"send": blocked_then_woken(plane, pid1, lambda: tdist.send(torch.ones(ELEMENTS), dst=1))}
    result["stranded_after_send"] = len(getattr(plane, "left_behind", ()))
    form(plane, store, 1, rank)
    result["all_reduce"] = blocked_then_woken(plane, pid1, lambda: tdist.all_reduce(torch.ones(1)))
    form(plane, store, 2, rank)
    x = torch.ones(1)
    tdist.all_reduce(x)
    result["gen2_sum"] = x.item()
    result["stranded_at_gen2"] = len(getattr(plane, "left_behind", ()))
    deadline = time.monotonic() + GLOO_TIMEOUT_S + 10
    while getattr(plane, "left_behind", None) and time.monotonic() < deadline:
        time.sleep(0.1)
    result["stranded_left_after_timeout"] = len(getattr(plane, "left_behind", ()))
    tdist.destroy_process_group()
    result["gloo_timeout_s"] = GLOO_TIMEOUT_S
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
