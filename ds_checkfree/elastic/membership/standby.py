"""A member's standby coordinator: the port it reserves when it joins, and the process it starts
there when the coordinator is lost and this member is the first live one in the standby list
(``failover``).

The port is reserved by a listening socket the member holds for its whole life, so the address
it hands out stays valid and answers a connect exactly while the member is alive. The standby
coordinator is a process of its own (``discovery.spawn_coordinator``) that inherits that socket:
a coordinator inside the training process would share its interpreter, and its connections would
be shut by the data plane's wake-up (``plane_sockets``). Once it is started, the member reserves a
fresh port for the next failover (its own standby may be lost too).
"""
from __future__ import annotations

import os
import socket
import tempfile

from ds_checkfree.elastic.membership.discovery import coordinator_command, spawn_coordinator
from ds_checkfree.elastic.membership.failover import collect_window_s


def reserve(addr: str) -> tuple[socket.socket | None, str]:
    """A listening socket at ``addr`` on a free port (None and why when none can be opened)."""
    try:
        return socket.create_server((addr, 0), backlog=128), ""
    except OSError as err:
        return None, f"cannot listen on {addr}: {err}"


def start(listener: socket.socket, member: int, position: int, expect: int, cf, dp: int,
          log_dir: str | None) -> tuple[int, str]:
    """Start the standby coordinator on ``listener`` (this member is ``position``-th in the
    standby list); returns (its pid, its announce file)."""
    folder = log_dir or tempfile.gettempdir()
    os.makedirs(folder, exist_ok=True)
    base = os.path.join(folder, f"failover-coordinator-m{member}-{os.getpid()}-{listener.getsockname()[1]}")
    fd = listener.fileno()
    cmd = coordinator_command(expect, cf, dp) + [
        "--listen_fd", str(fd), "--rebuild_s", f"{collect_window_s(position):g}", "--announce", base + ".json"]
    proc = spawn_coordinator(cmd, base + ".log", pass_fds=(fd,))
    return proc.pid, base + ".json"
