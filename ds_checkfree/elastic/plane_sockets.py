"""Wake a thread blocked on the data plane by shutting down the data plane's sockets.

A collective waiting on a peer that is stopped (SIGSTOP, a hung node) does not fail until
gloo's timeout: the peer's kernel keeps its connections open. When the coordinator says a
membership change is coming, the member shuts down every socket its data plane opened
(those that did not exist before the data plane began forming): gloo then reports a
closed connection at once and the main thread joins the recovery. ``shutdown`` acts on
the socket, not on a descriptor, so a duplicate is enough and nothing is closed under
gloo's feet. Linux only (``/proc/self/fd``); elsewhere this is a no-op and the data-plane
timeout stays the bound.
"""
from __future__ import annotations

import os
import socket


def socket_inodes() -> dict[int, str]:
    """This process's socket descriptors: fd -> ``socket:[inode]``."""
    out = {}
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for name in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:"):
            out[int(name)] = target
    return out


def shutdown_new_sockets(before: set[str]) -> int:
    """Shut down every socket not in ``before`` (inodes); returns how many."""
    count = 0
    for fd, inode in socket_inodes().items():
        if inode in before:
            continue
        try:
            dup = os.dup(fd)
        except OSError:
            continue
        try:
            s = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            continue
        try:
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                continue  # a listener: nothing waits on it in a collective
            s.shutdown(socket.SHUT_RDWR)
            count += 1
        except OSError:
            pass
        finally:
            s.close()
    return count
