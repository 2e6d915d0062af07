"""Heartbeats over MPI: the transport of the fault-tolerant (``mpirun --with-ft ulfm``) launch.

Every rank sends a tiny message to every live peer each ``interval`` seconds on its own
communicator (a ``Dup`` of COMM_WORLD with ``ERRORS_RETURN``), independent of the
training data plane, and drains what arrived. A send that MPI rejects because the peer
died (ULFM's ``MPI_ERR_PROC_FAILED``) marks it dead at once; silence longer than the
timeout marks it dead too.
"""
from __future__ import annotations

import time

import numpy as np

from .monitor import HeartbeatThread

_TAG = 7001


class MpiHeartbeat(HeartbeatThread):
    transport = "mpi"

    def __init__(self, comm_world, interval_s: float, timeout_s: float, clock=time.monotonic,
                 ab_window_s: float | None = None):
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = comm_world.Dup()
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)
        rank = self.comm.Get_rank()
        peers = [r for r in range(self.comm.Get_size()) if r != rank]
        super().__init__(rank, peers, interval_s, timeout_s, clock=clock, ab_window_s=ab_window_s)

    def _send_all(self, now: float) -> None:
        payload = np.array([now], dtype=np.float64)
        for peer in sorted(self.tracker.peers):
            if self._is_dead(peer, now):
                continue
            try:
                self.comm.Send(payload, dest=peer, tag=_TAG)
                self.beats_sent += 1
            except self.MPI.Exception as err:
                self._mark(peer, f"send failed: {err.Get_error_string().strip()}")

    def _drain(self, now: float) -> None:
        status = self.MPI.Status()
        buf = np.empty(1, dtype=np.float64)
        while True:
            try:
                if not self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=_TAG, status=status):
                    return
                self.comm.Recv(buf, source=status.Get_source(), tag=_TAG)
            except self.MPI.Exception:
                # a peer died: acknowledge so wildcard receives work again; the send path names it
                self.comm.Ack_failed()
                return
            self._beat(status.Get_source(), now)
