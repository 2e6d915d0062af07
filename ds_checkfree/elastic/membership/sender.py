"""One member's outgoing messages from the coordinator: a queue and a thread of their own.

The coordinator decides under one lock; sending under it would let one slow or stopped member
(its socket buffer full) stall every other member's messages and every decision. So a decision
only enqueues; each connection's sender thread writes its queue in order, and a failed write
just ends that thread (the connection's reader reports the member's departure).
"""
from __future__ import annotations

import json
import queue
import socket
import threading

_CLOSE = object()


class Sender:
    def __init__(self, sock: socket.socket, name: str = "member"):
        self.sock = sock
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"coordinator-send-{name}", daemon=True)
        self._thread.start()

    def send(self, msg: dict) -> None:
        """Queue one JSON line (never blocks)."""
        self._queue.put((json.dumps(msg) + "\n").encode())

    def close(self) -> None:
        """Shut the connection down once everything queued before this call is written."""
        self._queue.put(_CLOSE)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _CLOSE:
                break
            try:
                self.sock.sendall(item)
            except OSError:
                return  # the reader notices the closed connection
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
