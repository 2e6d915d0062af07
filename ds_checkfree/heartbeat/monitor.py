"""The transport-independent half of a heartbeat monitor: a thread around ``HeartbeatTracker``.

Each interval the thread sends its own beat, drains what arrived and turns silences into
verdicts; a transport (MPI in ``mpi``, the torch.distributed store in ``store``) supplies
``_send_all`` and ``_drain``. The main thread reads the verdicts at step boundaries
(``events``, ``summary``).
"""
from __future__ import annotations

import threading
import time

from .liveness import HeartbeatTracker


class HeartbeatThread:
    """Background heartbeat loop; subclasses move the beats."""

    transport = "?"

    def __init__(self, rank: int, peers: list[int], interval_s: float, timeout_s: float, clock=time.monotonic):
        self.rank = rank
        self.interval = interval_s
        self.clock = clock
        self.tracker = HeartbeatTracker(peers, dead_after=timeout_s, start_time=clock())
        self._lock = threading.Lock()
        self._events: list[dict] = []
        self._why: dict[int, str] = {}  # a reason learnt from the transport, before the verdict
        self._declared: list[int] = []
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
        if self._thread.is_alive():
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
        with self._lock:
            return self.tracker.is_dead(peer, now)

    def _mark(self, peer: int, why: str) -> None:
        """The transport itself saw ``peer`` fail."""
        with self._lock:
            self.tracker.mark_dead(peer)
            self._why.setdefault(peer, why)

    def _record_verdicts(self, now: float) -> None:
        with self._lock:
            for peer in sorted(self.tracker.newly_dead(now)):
                why = self._why.pop(peer, f"no heartbeat for {self.tracker.dead_after:.1f} s")
                self._declared.append(peer)
                self._events.append({"peer": peer, "time": time.time(), "reason": why})

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
            self._record_verdicts(now)
            self._stop.wait(self.interval)

    # -- main-thread API -----------------------------------------------------------------
    def summary(self) -> dict:
        """Counts and margins for metrics: how close a live peer came to the timeout."""
        with self._lock:
            return {"transport": self.transport, "interval_s": self.interval, "timeout_s": self.tracker.dead_after,
                    "beats_sent": self.beats_sent, "beats_received": self.beats_received,
                    "max_gap_s": round(self.max_gap_s, 4), "peers_declared_dead": sorted(self._declared),
                    "transport_error": self.transport_error}

    def events(self) -> list[dict]:
        """Failures seen since the last call (each reported once)."""
        with self._lock:
            out, self._events = self._events, []
            return out
