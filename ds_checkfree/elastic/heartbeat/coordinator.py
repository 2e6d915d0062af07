"""Heartbeats to the job's coordinator: the transport of the fault-tolerant launch.

Each member beats to the coordinator only (one small message per interval, not one per
peer); the coordinator turns silences into verdicts and tells every member which peer it
lost (``member_lost``), which this monitor reports as its events. A closed connection is
a verdict at once, so a killed process is known before its heartbeat would be missed.
Each beat carries the member's last completed step (the coordinator deletes a preemption
hand-off once every stage holder is past it). While the coordinator is being replaced the
client drops the beats (``MemberClient.send``): the thread goes on beating.
"""
from __future__ import annotations

import time

from ds_checkfree.elastic.heartbeat.monitor import HeartbeatThread


class CoordinatorHeartbeat(HeartbeatThread):
    transport = "coordinator"

    def __init__(self, client, interval_s: float, timeout_s: float, clock=time.monotonic,
                 ab_window_s: float | None = None):
        self.client = client
        super().__init__(client.id, [], interval_s, timeout_s, clock=clock, ab_window_s=ab_window_s)
        client.on_member_lost = self.member_lost

    def _send_all(self, now: float) -> None:
        if self.client.send({"op": "beat", "steps": self.client.progress()}):
            self.beats_sent += 1

    def _drain(self, now: float) -> None:
        pass  # verdicts arrive from the coordinator (``member_lost``), on the client's reader thread

    def member_lost(self, msg: dict) -> None:
        with self._lock:
            self._declared.append(msg["member"])
            self._events.append({"peer": msg["member"], "time": time.time(),
                                 "reason": ("evicted: " if msg.get("evicted") else "") + msg.get("why", "?")})
