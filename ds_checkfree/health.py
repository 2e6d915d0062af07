"""Liveness of pipeline peers as pure functions of (last-seen times, now, timeouts).

The clock is always passed in, so every transition is testable without sleeping. The
transport that actually moves heartbeats (an MPI control communicator or a thread on a
side channel) is a thin layer around ``HeartbeatTracker``; see ``HeartbeatTransport``.
"""
from __future__ import annotations

import math
from enum import Enum
from typing import Iterable, Mapping, Protocol


class PeerState(str, Enum):
    ALIVE = "alive"
    SUSPECTED = "suspected"
    DEAD = "dead"


def _check_timeouts(suspect_after: float, dead_after: float) -> None:
    if not (math.isfinite(suspect_after) and math.isfinite(dead_after)) or not 0 < suspect_after < dead_after:
        raise ValueError(
            f"need 0 < suspect_after < dead_after (seconds), got suspect_after={suspect_after!r}, "
            f"dead_after={dead_after!r}")


def liveness(
    last_seen: Mapping[int, float],
    now: float,
    suspect_after: float,
    dead_after: float,
) -> dict[int, PeerState]:
    """State of each peer from the age of its last heartbeat.

    age < suspect_after: ALIVE; suspect_after <= age < dead_after: SUSPECTED;
    age >= dead_after: DEAD. A heartbeat stamped after ``now`` (clock skew) counts as fresh.
    """
    _check_timeouts(suspect_after, dead_after)
    out = {}
    for peer, seen in last_seen.items():
        age = now - seen
        if age >= dead_after:
            out[peer] = PeerState.DEAD
        elif age >= suspect_after:
            out[peer] = PeerState.SUSPECTED
        else:
            out[peer] = PeerState.ALIVE
    return out


class HeartbeatTracker:
    """Latched liveness of a fixed set of peers.

    DEAD is sticky: once a peer timed out (or ``mark_dead`` was called), a late heartbeat
    does not bring it back, because the rest of the job has already started recovering
    without it; only an explicit ``rejoin`` does.
    """

    def __init__(self, peers: Iterable[int], suspect_after: float, dead_after: float, start_time: float):
        _check_timeouts(suspect_after, dead_after)
        self.suspect_after = float(suspect_after)
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
        states = liveness(self._last_seen, now, self.suspect_after, self.dead_after)
        for peer, state in states.items():
            if state is PeerState.DEAD:
                self._dead.add(peer)
        for peer in self._dead:
            states[peer] = PeerState.DEAD
        return states

    def newly_dead(self, now: float) -> set[int]:
        """Peers dead at ``now`` not reported by an earlier call (each peer reported once)."""
        dead = {p for p, s in self.states(now).items() if s is PeerState.DEAD}
        fresh = dead - self._reported
        self._reported |= fresh
        return fresh

    def mark_dead(self, peer: int) -> None:
        """A failure learnt from elsewhere (a gloo/MPI error): dead now, whatever the clock says."""
        self._known(peer)
        self._dead.add(peer)

    def rejoin(self, peer: int, t: float) -> None:
        """A replacement for ``peer`` is back: alive from ``t``, may be reported dead again later."""
        self._known(peer)
        self._dead.discard(peer)
        self._reported.discard(peer)
        self._last_seen[peer] = float(t)

    def alive(self, now: float) -> set[int]:
        """Peers not dead at ``now``. Suspected peers are included: only DEAD removes a peer."""
        return {p for p, s in self.states(now).items() if s is not PeerState.DEAD}

    def suspected(self, now: float) -> set[int]:
        return {p for p, s in self.states(now).items() if s is PeerState.SUSPECTED}


def agree_failed_set(reports: Iterable[set[int]]) -> set[int]:
    """The failed set all survivors adopt: the union of what each of them reports.

    This is what ULFM gives (``Comm.Agree`` over the acknowledged failures, or the
    complement of ``Comm.Shrink``'s group): a peer that any survivor saw fail is dropped
    by everyone, since a peer one survivor cannot reach cannot stay in a pipeline. The
    union is order-independent, so every survivor computes the same set from the same
    reports.
    """
    failed: set[int] = set()
    for report in reports:
        failed |= {int(p) for p in report}
    return failed


# --------------------------------------------------------------------------------------
# Transport (supplied by the engine side): moves heartbeats between ranks and feeds the
# tracker. It stays thin: all decisions are in HeartbeatTracker / liveness above.
# --------------------------------------------------------------------------------------
class HeartbeatTransport(Protocol):
    def send_beat(self, now: float) -> None:
        """Tell the peers this rank is alive."""

    def poll(self) -> list[tuple[int, float]]:
        """Heartbeats received since the last poll, as (peer, time) pairs for ``beat``."""

    def failed_peers(self) -> set[int]:
        """Peers the transport itself saw fail (e.g. MPI_ERR_PROC_FAILED), for ``mark_dead``."""
