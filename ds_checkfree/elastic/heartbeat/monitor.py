"""The transport-independent half of a heartbeat monitor: a thread around ``HeartbeatTracker``.

Each interval the thread sends its own beat, drains what arrived and turns silences into
verdicts; a transport (the coordinator's TCP connection in ``coordinator``, the
torch.distributed store in ``store``) supplies ``_send_all`` and ``_drain``. The main thread
reads the verdicts at step boundaries (``events``, ``summary``).
"""
from __future__ import annotations

import random
import threading
import time

from ds_checkfree.elastic.heartbeat.liveness import HeartbeatTracker


def ab_window_active(wall_time: float, window_s: float) -> tuple[bool, int, float]:
    """The A/B overhead benchmark's timetable: wall-clock windows of ``window_s`` seconds,
    taken in pairs; in each pair one window (drawn from a seed that is the pair's index, so
    every process and the benchmark agree) has the heartbeat on, the other off.
    Returns (heartbeat on?, pair index, seconds until this window ends)."""
    window = int(wall_time // window_s)
    pair = window // 2
    first_on = random.Random(f"heartbeat-ab-{pair}").random() < 0.5
    on = (window % 2 == 0) == first_on
    return on, pair, (window + 1) * window_s - wall_time


class HeartbeatThread:
    """Background heartbeat loop; subclasses move the beats."""

    transport = "?"

    def __init__(self, rank: int, peers: list[int], interval_s: float, timeout_s: float, clock=time.monotonic,
                 ab_window_s: float | None = None):
        """``ab_window_s`` (benchmarks only): beat only in the "on" windows of
        ``ab_window_active``, sleep through the others, so one run holds interleaved pairs of
        steps with and without heartbeats. Silences then last up to 2 windows + an interval."""
        if ab_window_s is not None and 2 * ab_window_s + interval_s >= timeout_s:
            raise ValueError(f"ab_window_s = {ab_window_s!r}: two silent windows plus an interval must stay below "
                             f"the heartbeat timeout ({timeout_s!r} s)")
        self.rank = rank
        self.interval = interval_s
        self.ab_window_s = ab_window_s
        self.clock = clock
        self.tracker = HeartbeatTracker(peers, dead_after=timeout_s, start_time=clock())
        self._lock = threading.Lock()
        self._events: list[dict] = []
        self._why: dict[int, str] = {}  # a reason learnt from the transport, before the verdict
        self._declared: list[int] = []
        self._stop = threading.Event()
        self.beats_received = 0
        self.beats_sent = 0
        #: CPU time this thread spent beating (its whole cost besides sleeping), and how often it woke
        self.cpu_s = 0.0
        self.wakeups = 0
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
            if self.ab_window_s:
                on, _, left = ab_window_active(time.time(), self.ab_window_s)
                if not on:  # sleep past the window's end by half an interval: beats never fall on a
                    self._stop.wait(left + self.interval / 2)  # window edge, where the benchmark drops the step
                    continue
            now, cpu0 = self.clock(), time.thread_time()
            try:
                self._send_all(now)
                self._drain(now)
            except Exception as err:  # noqa: BLE001 - a broken transport must not end training
                if not self._stop.is_set():
                    with self._lock:
                        self.transport_error = f"{type(err).__name__}: {err}"
                return
            self._record_verdicts(now)
            self.wakeups += 1
            self.cpu_s += time.thread_time() - cpu0
            self._stop.wait(self.interval)

    # -- main-thread API -----------------------------------------------------------------
    def summary(self) -> dict:
        """Counts and margins for metrics: how close a live peer came to the timeout."""
        with self._lock:
            return {"transport": self.transport, "interval_s": self.interval, "timeout_s": self.tracker.dead_after,
                    "beats_sent": self.beats_sent, "beats_received": self.beats_received,
                    "max_gap_s": round(self.max_gap_s, 4), "peers_declared_dead": sorted(self._declared),
                    "transport_error": self.transport_error, "wakeups": self.wakeups,
                    "thread_cpu_s": round(self.cpu_s, 6),
                    "cpu_per_wakeup_s": round(self.cpu_s / self.wakeups, 7) if self.wakeups else None}

    def events(self) -> list[dict]:
        """Failures seen since the last call (each reported once)."""
        with self._lock:
            out, self._events = self._events, []
            return out
