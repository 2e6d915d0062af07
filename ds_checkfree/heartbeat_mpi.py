"""Heartbeats over MPI: the thin thread around ``health.HeartbeatTracker``.

Every rank sends a tiny message to every live peer each ``interval`` seconds on its own
communicator (a ``Dup`` of COMM_WORLD with ``ERRORS_RETURN``), independent of the
training data plane, and drains what arrived. A send that MPI rejects because the peer
died (ULFM's ``MPI_ERR_PROC_FAILED``) marks it dead at once; silence longer than the
timeout marks it dead too. The main thread reads the verdicts at step boundaries.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from .health import HeartbeatTracker, PeerState

_TAG = 7001


class MpiHeartbeat:
    """Background heartbeat thread; ``dead()`` and ``events()`` are read by the trainer."""

    def __init__(self, comm_world, interval_s: float, timeout_s: float, clock=time.monotonic, on_dead=None):
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = comm_world.Dup()
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)
        self.rank = self.comm.Get_rank()
        self.interval = interval_s
        self.clock = clock
        peers = [r for r in range(self.comm.Get_size()) if r != self.rank]
        self.tracker = HeartbeatTracker(peers, suspect_after=max(interval_s * 2, timeout_s / 2),
                                        dead_after=timeout_s, start_time=clock())
        self._lock = threading.Lock()
        self._events: list[dict] = []
        self._reported: set[int] = set()
        self.on_dead = on_dead  # called from the heartbeat thread with the dead peer's rank
        self._stop = threading.Event()
        self.beats_received = 0
        self.beats_sent = 0
        self._last_arrival: dict[int, float] = {}
        self._started = clock()
        #: longest silence seen from any live peer (the margin below the timeout)
        self.max_gap_s = 0.0
        self._thread = threading.Thread(target=self._run, name="checkfree-heartbeat", daemon=True)

    def start(self) -> "MpiHeartbeat":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5 * self.interval + 1)

    # -- thread ------------------------------------------------------------------------
    def _send_all(self, now: float) -> None:
        payload = np.array([now], dtype=np.float64)
        for peer in sorted(self.tracker.peers):
            if self.tracker.states(now).get(peer) == PeerState.DEAD:
                continue
            try:
                self.comm.Send(payload, dest=peer, tag=_TAG)
                self.beats_sent += 1
            except self.MPI.Exception as err:
                self._mark(peer, now, f"send failed: {err.Get_error_string().strip()}")

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
            source = status.Get_source()
            with self._lock:
                self.tracker.beat(source, now)
                self.beats_received += 1
                gap = now - self._last_arrival.get(source, self._started)
                self.max_gap_s = max(self.max_gap_s, gap)
                self._last_arrival[source] = now

    def _mark(self, peer: int, now: float, why: str) -> None:
        with self._lock:
            self.tracker.mark_dead(peer)
            self._report(peer, why)

    def _report(self, peer: int, why: str) -> None:
        if peer not in self._reported:
            self._reported.add(peer)
            self._events.append({"peer": peer, "time": time.time(), "reason": why})
            if self.on_dead is not None:
                try:
                    self.on_dead(peer)
                except Exception:  # never let a callback kill the heartbeat thread
                    pass

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self.clock()
            self._send_all(now)
            self._drain(now)
            with self._lock:
                for peer, state in self.tracker.states(now).items():
                    if state == PeerState.DEAD:
                        self._report(peer, f"no heartbeat for {self.tracker.dead_after:.1f} s")
            self._stop.wait(self.interval)

    # -- main-thread API ----------------------------------------------------------------
    def dead(self) -> set[int]:
        with self._lock:
            now = self.clock()
            return {p for p, s in self.tracker.states(now).items() if s == PeerState.DEAD}

    def summary(self) -> dict:
        """Counts and margins for metrics: how close a live peer came to the timeout."""
        with self._lock:
            return {"interval_s": self.interval, "timeout_s": self.tracker.dead_after,
                    "beats_sent": self.beats_sent, "beats_received": self.beats_received,
                    "max_gap_s": round(self.max_gap_s, 4), "peers_declared_dead": sorted(self._reported)}

    def events(self) -> list[dict]:
        """Failures seen since the last call (each reported once)."""
        with self._lock:
            out, self._events = self._events, []
            return out
