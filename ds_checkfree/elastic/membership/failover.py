"""Finding the job's coordinator again after it is lost: the standby rule, from a member's side.

The rule, which every member applies alone (there is no one left to agree with):

- every member reserves a listening port at its advertised address when it joins and names it
  in its hello; the coordinator hands every member the list of these standby addresses ordered
  by member id (``Roster.standbys``) and sends it again whenever it changes;
- a member that loses the coordinator (its connection closed, or no ``alive`` for
  ``heartbeat_timeout_s``) first asks the lost coordinator's own address, briefly: when only
  this member's connection broke, the coordinator is still there and takes it back (or, if it
  already counted it as gone, refuses it: the job went on without it). Then it walks the
  standby list from the lowest id: its own entry means "start the
  standby coordinator here, on the reserved port" (``standby.start``); any other entry is tried
  with a TCP connect. A reserved port is held open by its member for the member's whole life, so
  a connect is refused (or times out, when the host is gone) exactly when that member is dead,
  and the walk moves on; a connect that succeeds waits for the coordinator's welcome (that member
  may still be noticing the loss and starting its standby);
- so every member ends at the lowest-id member that is still alive and reachable, and
  re-registers there with its ``Report`` (``rebuild``).

What it does not survive: a network partition that lets some members reach a standby and not
others (each side then elects its own; the side without the stages stops, named); processes
joining later with ``--join`` at the first coordinator's address (the new address is in the
standby's announce file, ``failover-coordinator-m<id>.json``, and in every member's log).
"""
from __future__ import annotations

import json
import socket

#: how long a connect to a standby address may take before the next one is tried (a dead host)
CONNECT_TIMEOUT_S = 3.0
#: how long the lost coordinator's own address may take to answer (a live coordinator answers at once)
PROBE_TIMEOUT_S = 3.0
#: how long a member waits for a reachable standby's welcome (it may still be noticing the loss,
#: up to ``heartbeat_timeout_s``, and starting the coordinator: a Python process importing torch)
WELCOME_SLACK_S = 60.0


class Refused(Exception):
    """The standby coordinator refused this member: the job went on without it."""


def collect_window_s(position: int) -> float:
    """How long a standby waits for the members' reports when it is ``position``-th in the
    list. Members notice the loss together (the same closed connection, or the same silence,
    give or take a beat) and those behind it reach it after at most ``position`` failed
    connects; a member that comes later is refused and leaves (its stage is replaced)."""
    return 5.0 + CONNECT_TIMEOUT_S * position


def plain_connect(addr: str, port: int, timeout_s: float) -> socket.socket:
    return socket.create_connection((addr, port), timeout=timeout_s)


def walk(standbys: list, me: int, start_own, hello, welcome_timeout_s: float, log, connect=plain_connect,
         lost: tuple[str, int] | None = None):
    """Reconnect by the rule above. ``start_own()`` starts this member's standby (False: it has
    none); ``hello()`` the message to re-register with; ``connect(addr, port, timeout_s)`` opens
    the connection (a member's keeps it out of its data plane's reach); ``lost``: the lost
    coordinator's address, probed first. Returns (socket, reader, welcome, (host, port)), or
    None when no entry answered; raises ``Refused``."""
    entries = [(None, *lost)] if lost is not None else []
    for mid, addr, port in entries + [tuple(s) for s in standbys]:
        what = "the lost coordinator" if mid is None else f"standby coordinator of member {mid}"
        if mid == me and not start_own():
            continue
        try:
            sock = connect(addr, port, CONNECT_TIMEOUT_S)
        except OSError as err:
            log(f"{what} at {addr}:{port} unreachable ({err}); trying the next")
            continue
        sock.settimeout(PROBE_TIMEOUT_S if mid is None else welcome_timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall((json.dumps(hello()) + "\n").encode())
            reader = sock.makefile("r", encoding="utf-8")
            line = reader.readline()
            msg = json.loads(line) if line else None
        except (OSError, ValueError) as err:
            log(f"{what} at {addr}:{port} did not answer ({err}); trying the next")
            msg = None
        if msg is not None and msg.get("op") == "refused":
            sock.close()
            raise Refused(msg.get("why", "?"))
        if msg is None or msg.get("op") != "welcome":
            sock.close()
            continue
        sock.settimeout(None)
        return sock, reader, msg, (addr, port)
    return None
