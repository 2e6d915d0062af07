"""Liveness of peers as pure functions of (last-seen times, now, timeout).

The clock is always passed in, so every transition is testable without sleeping; the
thread that moves heartbeats (``monitor``) is a thin layer around ``HeartbeatTracker``.
"""
from __future__ import annotations

import math
from enum import Enum
from typing import Iterable, Mapping


class PeerState(str, Enum):
    ALIVE = "alive"
    DEAD = "dead"


def _check_timeout(dead_after: float) -> None:
    if not math.isfinite(dead_after) or dead_after <= 0:
        raise ValueError(f"need a finite dead_after > 0 (seconds), got {dead_after!r}")


def liveness(last_seen: Mapping[int, float], now: float, dead_after: float) -> dict[int, PeerState]:
    """DEAD when the last heartbeat is ``dead_after`` seconds old or older, else ALIVE.
    A heartbeat stamped after ``now`` (clock skew) counts as fresh."""
    _check_timeout(dead_after)
    return {peer: PeerState.DEAD if now - seen >= dead_after else PeerState.ALIVE for peer, seen in last_seen.items()}


class HeartbeatTracker:
    """Latched liveness of a fixed set of peers.

    DEAD is sticky: once a peer timed out (or ``mark_dead`` was called), a late heartbeat
    does not bring it back, because the rest of the job has already started recovering
    without it; only an explicit ``rejoin`` does.
    """

    def __init__(self, peers: Iterable[int], dead_after: float, start_time: float):
        _check_timeout(dead_after)
        self.dead_after = float(dead_after)
        self._last_seen: dict[int, float] = {int(p): float(start_time) for p in peers}
        self._dead: set[int] = set()
        self._reported: set[int] = set()

    def _known(self, peer: int) -> None:
        if peer not in self._last_seen:
            raise ValueError(f"unknown peer {peer!r}; tracked peers are {sorted(self._last_seen)}")

    @property
    def peers(self) -> set[int]:
        return set(self._last_seen)

    def beat(self, peer: int, t: float) -> bool:
        """Record a heartbeat; returns False (and ignores it) if the peer is already dead."""
        self._known(peer)
        if peer in self._dead:
            return False
        # heartbeats may arrive out of order: never move last-seen backwards
        self._last_seen[peer] = max(self._last_seen[peer], float(t))
        return True

    def states(self, now: float) -> dict[int, PeerState]:
        """Current state of every peer; newly timed-out peers are latched as dead."""
        states = liveness(self._last_seen, now, self.dead_after)
        self._dead |= {p for p, s in states.items() if s is PeerState.DEAD}
        return {p: PeerState.DEAD if p in self._dead else PeerState.ALIVE for p in states}

    def is_dead(self, peer: int, now: float) -> bool:
        return self.states(now)[peer] is PeerState.DEAD

    def newly_dead(self, now: float) -> set[int]:
        """Peers dead at ``now`` not reported by an earlier call (each peer reported once)."""
        dead = {p for p, s in self.states(now).items() if s is PeerState.DEAD}
        fresh = dead - self._reported
        self._reported |= fresh
        return fresh

    def mark_dead(self, peer: int) -> None:
        """A failure learnt from elsewhere (an MPI error): dead now, whatever the clock says."""
        self._known(peer)
        self._dead.add(peer)

    def rejoin(self, peer: int, t: float) -> None:
        """A replacement for ``peer`` is back: alive from ``t``, may be reported dead again later."""
        self._known(peer)
        self._dead.discard(peer)
        self._reported.discard(peer)
        self._last_seen[peer] = float(t)

    def alive(self, now: float) -> set[int]:
        return {p for p, s in self.states(now).items() if s is PeerState.ALIVE}
