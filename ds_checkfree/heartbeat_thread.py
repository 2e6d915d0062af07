"""The transport-independent half of a heartbeat monitor: a thread around ``HeartbeatTracker``.

Each interval the thread sends its own beat, drains what arrived and turns silences into
verdicts; a transport (MPI in ``heartbeat_mpi``, the torch.distributed store in
``heartbeat_store``) supplies ``_send_all`` and ``_drain``. The main thread reads the
verdicts at step boundaries (``events``, ``dead``, ``summary``).
"""
from __future__ import annotations

import threading
import time

from .health import HeartbeatTracker, PeerState


class HeartbeatThread:
    """Background heartbeat loop; subclasses move the beats."""

    def __init__(self, rank: int, peers: list[int], interval_s: float, timeout_s: float, clock=time.monotonic,
                 on_dead=None):
        self.rank = rank
        self.interval = interval_s
        self.clock = clock
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
        self.transport_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="checkfree-heartbeat", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5 * self.interval + 1)

    # -- transport hooks -----------------------------------------------------------------
    def _send_all(self, now: float) -> None:
        raise NotImplementedError

    def _drain(self, now: float) -> None:
        raise NotImplementedError

    # -- shared bookkeeping (heartbeat thread) ---------------------------------------------
    def _beat(self, source: int, now: float) -> None:
        with self._lock:
            self.tracker.beat(source, now)
            self.beats_received += 1
            gap = now - self._last_arrival.get(source, self._started)
            self.max_gap_s = max(self.max_gap_s, gap)
            self._last_arrival[source] = now

    def _is_dead(self, peer: int, now: float) -> bool:
        return self.tracker.states(now).get(peer) == PeerState.DEAD

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
            try:
                self._send_all(now)
                self._drain(now)
            except Exception as err:  # noqa: BLE001 - a broken transport must not end training
                if not self._stop.is_set():
                    with self._lock:
                        self.transport_error = f"{type(err).__name__}: {err}"
                return
            with self._lock:
                for peer, state in self.tracker.states(now).items():
                    if state == PeerState.DEAD:
                        self._report(peer, f"no heartbeat for {self.tracker.dead_after:.1f} s")
            self._stop.wait(self.interval)

    # -- main-thread API -----------------------------------------------------------------
    def dead(self) -> set[int]:
        with self._lock:
            now = self.clock()
            return {p for p, s in self.tracker.states(now).items() if s == PeerState.DEAD}

    def summary(self) -> dict:
        """Counts and margins for metrics: how close a live peer came to the timeout."""
        with self._lock:
            return {"transport": self.transport, "interval_s": self.interval, "timeout_s": self.tracker.dead_after,
                    "beats_sent": self.beats_sent, "beats_received": self.beats_received,
                    "max_gap_s": round(self.max_gap_s, 4), "peers_declared_dead": sorted(self._reported),
                    "transport_error": self.transport_error}

    def events(self) -> list[dict]:
        """Failures seen since the last call (each reported once)."""
        with self._lock:
            out, self._events = self._events, []
            return out
