"""Heartbeats over the torch.distributed store: the monitor of the non-MPI launches.

Under ``deepspeed`` or ``torchrun`` there is no MPI, but every rank can reach the
rendezvous TCPStore (``MASTER_ADDR:MASTER_PORT``). Each rank bumps its own counter key
each interval through a client of its own (the trainer's client is not shared across
threads) and reads its peers' counters: a counter that moved is a beat. A peer that stops
beating is reported (``heartbeat_timeout``); these launchers end the whole job when a
process dies, so here the monitor reports stalls and deaths but cannot survive them.
"""
from __future__ import annotations

import os
import time
from datetime import timedelta

from ds_checkfree.elastic.heartbeat.monitor import HeartbeatThread

_PREFIX = "checkfree_heartbeat/"


class StoreHeartbeat(HeartbeatThread):
    transport = "store"

    def __init__(self, rank: int, world_size: int, interval_s: float, timeout_s: float, clock=time.monotonic,
                 host: str | None = None, port: int | None = None):
        import torch.distributed as dist
        host = host or os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = int(port or os.environ["MASTER_PORT"])
        self.store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=max(timeout_s, 5.0)),
                                   wait_for_workers=False)
        super().__init__(rank, [r for r in range(world_size) if r != rank], interval_s, timeout_s, clock=clock)
        self._counter = 0
        self._seen: dict[int, bytes] = {}

    def _send_all(self, now: float) -> None:
        self._counter += 1
        self.store.set(f"{_PREFIX}{self.rank}", str(self._counter))
        self.beats_sent += 1

    def _drain(self, now: float) -> None:
        peers = sorted(self.tracker.peers)
        keys = [f"{_PREFIX}{p}" for p in peers]
        present = [k for k in keys if self.store.check([k])]
        values = dict(zip(present, self.store.multi_get(present))) if present else {}
        for peer, key in zip(peers, keys):
            value = values.get(key)
            if value is not None and value != self._seen.get(peer):
                self._seen[peer] = value
                self._beat(peer, now)
